"""The encoder and search services as local subprocesses for `python -m loadtest --start-local`.

The launcher itself is `demo.launcher.LocalService` (the project's one launcher, shared with the
demo): it keeps its port and process so that the fault run can stop the search service and start
it again on the same port and the same milvus-lite file, and the soak run can read the services'
memory (RSS). Importing this module does not import locust or grpc.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from demo.launcher import LocalService

ENCODER_HEALTH = "teran.v1.EncoderService"
SEARCH_HEALTH = "teran.v1.SearchService"


@contextmanager
def start_local(model_dir: str | Path, workdir: str | Path, *, shutdown_grace_s: float = 5.0, encoder_precision: str | None = None):
    """Start the encoder on `model_dir` (its `--precision encoder_precision` when given) and the search service on a
    fresh milvus-lite file in `workdir`; yield both; stop both."""
    workdir = Path(workdir)
    model_dir = Path(model_dir).resolve()
    if not (model_dir / "manifest.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no manifest.json (make one with `python -m export ...`)")
    grace = ["--shutdown-grace-s", str(shutdown_grace_s), "--log-format", "text"]
    precision = ["--precision", encoder_precision] if encoder_precision else []
    encoder = LocalService("encoder_service", ENCODER_HEALTH, ["--model-dir", str(model_dir), *precision, *grace], workdir / "encoder.log")
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
