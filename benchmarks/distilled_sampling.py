"""Images/s of every sampler of a finished workflow, side by side on this machine: the teacher DiT
at 64, 32, 16, 8 and 4 guided DDIM steps and the distilled student at each step count it supports,
decoding included, in interleaved rounds (so a busy moment hurts every sampler alike). Prints each
sampler's median images/s, network evaluations per image, and its speed-up over the 64-step teacher.

  python benchmarks/distilled_sampling.py --workflow-id ID --storage outputs/mnist
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from components.autoencoder.load import load_autoencoder  # noqa: E402
from components.distill.load import load_student  # noqa: E402
from components.distill.sample import generate_student, supported_steps  # noqa: E402
from components.dit.generate import generate  # noqa: E402
from components.dit.load import load_dit  # noqa: E402
from pipelines.sample import dit_sampling_defaults, find_summary, sampling_config, step_manifest  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workflow-id", required=True)
    parser.add_argument("--storage", default=None, help="the pipeline's storage.root")
    parser.add_argument("--images", type=int, default=100, help="per sampler and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--teacher-steps", default="64,32,16,8,4")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    summary_uri, summary = find_summary(args.workflow_id, args.storage)
    dit_manifest = step_manifest(summary, "dit", summary_uri)
    dit, dit_meta = load_dit(dit_manifest)
    ae, ae_meta = load_autoencoder(step_manifest(summary, "autoencoder", summary_uri))
    student, student_meta = load_student(step_manifest(summary, "distill", summary_uri))
    base = sampling_config(dit_sampling_defaults(dit_manifest, dit_meta))
    labels = torch.arange(args.images) % int(dit_meta["num_classes"])

    samplers = {}
    for steps in (int(s) for s in args.teacher_steps.split(",")):
        sampling = base.model_copy(update={"steps": steps})
        nfe = steps * (2 if sampling.guidance > 0 else 1)
        samplers[f"teacher {steps} steps (w={sampling.guidance:g})"] = (
            nfe, lambda s=sampling: generate(dit, dit_meta, ae, ae_meta, labels, s))
    for steps in supported_steps(student_meta):
        samplers[f"student {student_meta['method']} {steps} steps"] = (
            steps, lambda k=steps: generate_student(student, student_meta, ae, ae_meta, labels, steps=k))

    rates = {name: [] for name in samplers}
    for _ in range(args.rounds):
        for name, (_, draw) in samplers.items():
            started = time.perf_counter()
            draw()
            rates[name].append(args.images / (time.perf_counter() - started))
    reference = statistics.median(rates[next(iter(samplers))])
    print(f"{args.images} images per sampler and round, {args.rounds} rounds, {args.threads} threads, "
          f"{dit_meta['latent_shape']} latents")
    print(f"{'sampler':<44} {'NFE':>5} {'images/s':>10} {'vs teacher 64':>14}")
    for name, (nfe, _) in samplers.items():
        rate = statistics.median(rates[name])
        print(f"{name:<44} {nfe:>5} {rate:>10.1f} {rate / reference:>13.1f}x")


if __name__ == "__main__":
    main()
