"""The encoder and search services as local subprocesses for `python -m loadtest --start-local`.

Unlike `demo.steps.service` (a context manager that hides its process), a `LocalService` keeps its
port and process so that the fault run can stop it and start it again on the same port and the
same milvus-lite file, and the soak run can read its memory (RSS). Ports come from
`demo.steps.free_port`; each process runs in its own session so that stopping it also stops
anything it started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

from demo.steps import PYTHON, REPO, free_port

ENCODER_HEALTH = "teran.v1.EncoderService"
SEARCH_HEALTH = "teran.v1.SearchService"


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the load generator dies (Linux), so no service outlives it."""
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


class LocalService:
    """`python -m MODULE ARGS --host 127.0.0.1 --port PORT --metrics-port -1`, restartable on the same port."""

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
        """Start the process and wait until its grpc.health.v1 status is SERVING; returns the seconds it took."""
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
                    raise RuntimeError(f"{self.module} exited with code {self.process.returncode}: {self.log_tail()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.module} did not become SERVING in {self.start_timeout_s:.0f} s: {self.log_tail()}")
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


@contextmanager
def start_local(model_dir: str | Path, workdir: str | Path, *, shutdown_grace_s: float = 5.0):
    """Start the encoder on `model_dir` and the search service on a fresh milvus-lite file in `workdir`; yield both; stop both."""
    workdir = Path(workdir)
    model_dir = Path(model_dir).resolve()
    if not (model_dir / "manifest.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no manifest.json (make one with `python -m export ...`)")
    grace = ["--shutdown-grace-s", str(shutdown_grace_s), "--log-format", "text"]
    encoder = LocalService("encoder_service", ENCODER_HEALTH, ["--model-dir", str(model_dir), *grace], workdir / "encoder.log")
    database = workdir / "loadtest-search.db"
    if database.exists():
        raise FileExistsError(f"{database} exists: the load test starts on a fresh milvus-lite file")
    search = LocalService(
        "search_service",
        SEARCH_HEALTH,
        ["--milvus-uri", str(database), "--encoder-address", encoder.address, *grace],
        workdir / "search.log",
    )
    try:
        encoder.start()
        search.start()
        yield encoder, search
    finally:
        search.stop()
        encoder.stop()
