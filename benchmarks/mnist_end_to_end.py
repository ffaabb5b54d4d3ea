"""Time the mnist preset end to end (`make demo`'s pipeline) from an empty storage root.

Prints each step's duration, the total wall time (Ray start-up included) and the evaluate step's
scores. Not a test: run it by hand, on a quiet machine.

    .venv/bin/python benchmarks/mnist_end_to_end.py [--config configs/pipeline/mnist.yaml] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs/pipeline/mnist.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override")
    parser.add_argument("--root", help="storage root (default: a fresh temporary directory)")
    args = parser.parse_args()

    root = Path(args.root or tempfile.mkdtemp(prefix="latentflow-e2e-"))
    command = [sys.executable, "-m", "pipelines.cli", "run", args.config, "--set", f"storage.root={root}",
               "--workflow-id", "e2e"]
    for override in args.overrides:
        command += ["--set", override]
    t0 = time.monotonic()
    done = subprocess.run(command, cwd=REPO)
    wall = time.monotonic() - t0
    summary = json.loads((root / "workflows" / "e2e" / "summary.json").read_text())

    print(f"\n{'step':<14}{'status':<10}{'seconds':>9}")
    for s in summary["steps"]:
        print(f"{s['name']:<14}{s['status']:<10}{s['duration_s']:>9.1f}")
    print(f"{'total wall':<24}{wall:>9.1f}   (exit {done.returncode})")
    for s in summary["steps"]:
        if (s["name"] in ("autoencoder", "dit", "distill", "evaluate") or s["name"].startswith("superres")) and s["manifest_uri"]:
            metrics = json.loads(Path(s["manifest_uri"]).read_text())["metrics"]  # a local root: a path
            shown = {k: round(v, 4) for k, v in metrics.items() if not k.startswith("sample_accuracy_class")}
            print(f"{s['name']}: {shown}")


if __name__ == "__main__":
    main()
