"""Build-or-reuse steps of the demo: trained checkpoint, exported model directory, services."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def short_path(path: Path) -> str:
    """A path relative to the repository when it lies inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def log(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def run_step(args: list[str]) -> None:
    """Run a project CLI as a child process, showing its progress; stop the demo if it fails."""
    log("running: " + " ".join(args))
    result = subprocess.run([PYTHON, *args], cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"[demo] step failed with exit code {result.returncode}: {' '.join(args)}")


def ensure_checkpoint(checkpoint: Path, config: Path) -> Path:
    """The committed trained model, or train one (about half an hour on 2 CPU cores)."""
    if checkpoint.is_file():
        log(f"model: {short_path(checkpoint)} (trained; reused)")
        return checkpoint
    log(f"model: {checkpoint} is missing, training one with {config}")
    run_step(["-m", "teran.train", "--config", str(config), "--output-dir", "runs/demo"])
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(REPO / "runs" / "demo" / "best.pt", checkpoint)
    return checkpoint


def ensure_model_dir(checkpoint: Path, model_dir: Path) -> Path:
    """Export the checkpoint unless `model_dir` already holds exactly this checkpoint's export."""
    from teran.cache import file_digest
    from teran.errors import TeranInputError
    from teran.manifest import load_manifest

    digest = file_digest(checkpoint)
    try:
        manifest = load_manifest(model_dir, verify=False)
        if manifest.source.sha256 == digest:
            log(f"exported model: {short_path(model_dir)} (reused)")
            return model_dir
    except TeranInputError:
        pass
    run_step(["-m", "export", "--checkpoint", str(checkpoint), "--output", str(model_dir), "--name", "teran-flickr8k", "--force"])
    return model_dir


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def service(module: str, health_name: str, args: list[str]):
    """Start `python -m MODULE` on a free loopback port; yield its address once its grpc.health.v1
    status is SERVING; SIGTERM (graceful shutdown) on exit. Its log goes to artifacts/demo/."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port = free_port()
    address = f"127.0.0.1:{port}"
    log_path = REPO / "artifacts" / "demo" / f"{module}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [PYTHON, "-m", module, *args, "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "-1"]
    with log_path.open("w") as log_file:
        process = subprocess.Popen(command, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            started = time.monotonic()
            with grpc.insecure_channel(address) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                while True:
                    if process.poll() is not None:
                        raise SystemExit(f"[demo] {module} exited with code {process.returncode}; see {short_path(log_path)}")
                    if time.monotonic() - started > 180:
                        raise SystemExit(f"[demo] {module} did not become SERVING in 180 s; see {short_path(log_path)}")
                    try:
                        status = health.Check(health_pb2.HealthCheckRequest(service=health_name), timeout=2).status
                        if status == health_pb2.HealthCheckResponse.SERVING:
                            break
                    except grpc.RpcError:
                        pass
                    time.sleep(0.2)
            log(f"{module}: SERVING on {address} after {time.monotonic() - started:.1f}s (log: {short_path(log_path)})")
            yield address
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
