"""Real Ray nodes on this machine for the tests that are about clusters: a head (``ray start --head``)
and worker nodes joining it (``ray start --address``), each its own raylet with its own node id.

Every node runs with token authentication (Ray's default for local clusters since 2.59), every
port chosen free (a second Ray on this machine must not collide with the test session's), and the
project's virtual environment first on its PATH, as a user who activated it would start it. Each
node is a process group (``--block``): killing the group is losing that machine.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def node_env(token_path: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a node's processes (and of a client): token auth, the venv, ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "AWS_", "MLFLOW_"))}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path), PATH=f"{VENV_BIN}{os.pathsep}{env['PATH']}")
    env.update(extra or {})
    return env


class RayNode:
    """One ``ray start --block`` process group; ``kill()`` takes the node down at once (SIGKILL)."""

    def __init__(self, home: Path, env: dict[str, str], num_cpus: int, head_port: int | None = None,
                 dashboard: bool = False):
        self.home, self.env, self.is_head = home, env, head_port is None
        agent_http, agent_grpc, runtime_env, metrics, node_manager, object_manager = free_ports(6)
        args = [str(VENV_BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
                f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
                f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
                f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
                "--disable-usage-stats"]
        if self.is_head:
            self.gcs_port, self.dashboard_port = free_ports(2)
            temp_dir = Path("/tmp") / f"lf-ray-{secrets.token_hex(3)}"  # short: Ray's unix sockets live here
            args += ["--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                     f"--dashboard-port={self.dashboard_port}", f"--include-dashboard={str(dashboard).lower()}",
                     f"--temp-dir={temp_dir}"]
        else:
            args += [f"--address=127.0.0.1:{head_port}"]
        self.log = home / ("head.log" if self.is_head else f"node-{secrets.token_hex(3)}.log")
        self.process = subprocess.Popen(args, env=env, stdout=open(self.log, "w"), stderr=subprocess.STDOUT,
                                        start_new_session=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def wait_for_dashboard(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2)
                return
            except urllib.error.HTTPError:  # 401 without the token: the server is up
                return
            except OSError:
                self._check_alive(deadline)
                time.sleep(1)

    def _check_alive(self, deadline: float) -> None:
        if self.process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the Ray node did not start: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(10)

    def stop(self) -> None:
        """A graceful stop (SIGTERM) that becomes a kill after 5 s (a graceful stop took over 15 s here)."""
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.kill()
        except ProcessLookupError:
            pass


def wait_for_nodes(address: str, env: dict[str, str], count: int, timeout_s: float = 90) -> list[str]:
    """The ids of the cluster's alive nodes, once there are ``count``, asked from a fresh process."""
    script = ("import ray, json; ray.init(address=%r, logging_level='ERROR'); "
              "print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']]))") % address
    deadline = time.monotonic() + timeout_s
    while True:
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
        if out.returncode == 0:
            import json

            nodes = json.loads(out.stdout.strip().splitlines()[-1])
            if len(nodes) >= count:
                return nodes
        if time.monotonic() > deadline:
            raise RuntimeError(f"the cluster at {address} has not {count} nodes: {out.stdout[-1000:]} {out.stderr[-2000:]}")
        time.sleep(2)
