"""One of our gRPC services as a local subprocess on loopback: start, wait until healthy, stop, restart.

The one launcher of the project: the demo (`demo.steps.service`) and the load test runner
(`loadtest.services.start_local`, whose fault run restarts the search service on the same port
and whose soak run reads the services' memory) both use `LocalService`. Each process runs in
its own session, so that stopping it also stops anything it started, and gets SIGTERM when its
parent dies (Linux), so that no service outlives the program that started it.

Standard library only at import time (grpc is imported when a service starts): the demo must
not import locust or gevent through it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the parent dies (Linux), so no service outlives it."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc (Linux)."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def tree_rss_bytes(pid: int) -> int | None:
    """Resident memory of a process and all its descendants (bytes), or None where /proc has no such process."""
    if not Path(f"/proc/{pid}").is_dir():
        return None
    tree = _children()
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        stack.extend(tree.get(current, []))
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


class ServiceStartError(RuntimeError):
    """The service exited or did not become SERVING in time; `reason` says which (the message adds its log's tail)."""

    def __init__(self, reason: str, log_tail: str):
        super().__init__(f"{reason}: {log_tail}")
        self.reason = reason


class LocalService:
    """`python -m MODULE ARGS --host 127.0.0.1 --port PORT --metrics-port -1`, restartable on the same port.

    Its output is appended to `log_path`, one `--- start N: COMMAND` line before each start."""

    def __init__(
        self, module: str, health_name: str, args: list[str], log_path: Path, port: int | None = None, start_timeout_s: float = 180.0
    ):
        self.module = module
        self.health_name = health_name
        self.args = list(args)
        self.log_path = Path(log_path)
        self.port = port or free_port()
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen | None = None
        self.pids: list[int] = []  # of every start

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None and self.process.poll() is None else None

    def rss_bytes(self) -> int | None:
        return tree_rss_bytes(self.pid) if self.pid else None

    def start(self) -> float:
        """Start the process and wait until its grpc.health.v1 status is SERVING; returns the seconds it took.
        Raises ServiceStartError (after killing the process) when it exits or is not SERVING in time."""
        command = [PYTHON, "-m", self.module, *self.args, "--host", "127.0.0.1", "--port", str(self.port), "--metrics-port", "-1"]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        started = time.monotonic()
        with self.log_path.open("a") as log_file:
            log_file.write(f"--- start {len(self.pids) + 1}: {' '.join(command)}\n")
            log_file.flush()
            self.process = subprocess.Popen(
                command, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent
            )
        self.pids.append(self.process.pid)
        try:
            self.wait_serving(started + self.start_timeout_s)
        except BaseException:
            self.stop(signal.SIGKILL)
            raise
        return time.monotonic() - started

    def wait_serving(self, deadline: float) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.process.poll() is not None:
                    raise ServiceStartError(f"{self.module} exited with code {self.process.returncode}", self.log_tail())
                if time.monotonic() > deadline:
                    raise ServiceStartError(f"{self.module} did not become SERVING in {self.start_timeout_s:.0f} s", self.log_tail())
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(service=self.health_name), timeout=2).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Send `sig` (SIGTERM: graceful drain) and wait for the exit; SIGKILL the session after `timeout`."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        try:  # anything the service started (its own session) goes too
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return process.wait(timeout=10)

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""
