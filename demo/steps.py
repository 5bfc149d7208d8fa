"""Build-or-reuse steps of the demo: trained checkpoint, exported model directory, services."""

from __future__ import annotations

import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

from demo.launcher import PYTHON, REPO, LocalService, ServiceStartError


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


@contextmanager
def service(module: str, health_name: str, args: list[str]):
    """Start `python -m MODULE` on a free loopback port; yield its address once its grpc.health.v1
    status is SERVING; SIGTERM (graceful shutdown) on exit. Its log goes to artifacts/demo/."""
    log_path = REPO / "artifacts" / "demo" / f"{module}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("")  # a fresh log for each demo run
    launched = LocalService(module, health_name, args, log_path)
    try:
        seconds = launched.start()  # stops the process itself when it fails
    except ServiceStartError as error:
        raise SystemExit(f"[demo] {error.reason}; see {short_path(log_path)}") from None
    log(f"{module}: SERVING on {launched.address} after {seconds:.1f}s (log: {short_path(log_path)})")
    try:
        yield launched.address
    finally:
        launched.stop()
