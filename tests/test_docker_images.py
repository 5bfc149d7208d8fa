"""The serving images build (no container engine runs here, so this does what `docker build` would).

Each docker/*.Dockerfile's build stage is replayed: its build context is assembled from the
repository by the rules of .dockerignore (the last matching pattern wins; a pattern that matches a
folder matches everything under it), its COPY instructions place the files, and the copied project
is installed with `pip install ".[serve]"` into a fresh virtual environment. From there, outside
the repository, both services must start without torch and answer grpc.health.v1.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from encoder_fixtures import build_synthetic_model_dir
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytestmark = pytest.mark.slow  # installs each image's packages into fresh virtual environments

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))
ENTRYPOINT = re.compile(r'^ENTRYPOINT \["python", "-m", "(\w+)"\]', re.M)


# ---------------------------------------------------------------- .dockerignore


def _pattern_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regex over a slash-separated path."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            if pattern.startswith("/", i):  # `**/x` also matches `x` at the top
                out[-1] = "(?:.*/)?"
                i += 1
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def dockerignore_rules(text: str) -> list[tuple[bool, str, re.Pattern]]:
    """(re-included?, cleaned pattern, regex) per rule, in order."""
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        include = line.startswith("!")
        pattern = line[1:].strip() if include else line
        pattern = pattern.strip("/") or "."
        rules.append((include, pattern, _pattern_regex(pattern)))
    return rules


def in_context(path: str, rules) -> bool:
    """Whether `path` (relative, slash-separated) is in the build context: the last rule that matches
    it or one of its parent folders decides; no rule: included."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    decision = True
    for include, _, regex in rules:
        if any(regex.match(c) for c in candidates):
            decision = include
    return decision


def build_context(root: Path) -> list[str]:
    """Every file of the build context, relative to `root`. A folder that is out of the context and
    that no re-include pattern reaches into is not walked (as the docker client does)."""
    rules = dockerignore_rules((root / ".dockerignore").read_text())
    reach = [pattern for include, pattern, _ in rules if include]
    files = []
    for folder, dirs, names in os.walk(root):
        rel_folder = Path(folder).relative_to(root).as_posix()
        rel_folder = "" if rel_folder == "." else rel_folder + "/"
        dirs[:] = [
            d
            for d in sorted(dirs)
            if in_context(rel_folder + d, rules) or any(p.startswith(rel_folder + d + "/") or "*" in p for p in reach)
        ]
        files += [rel_folder + n for n in sorted(names) if in_context(rel_folder + n, rules)]
    return files


def build_stage_copies(dockerfile: Path) -> list[tuple[list[str], str]]:
    """The (sources, destination) of each COPY of the first (build) stage, other than --from copies."""
    copies, stage = [], 0
    for line in dockerfile.read_text().splitlines():
        if line.startswith("FROM "):
            stage += 1
        elif line.startswith("COPY ") and stage == 1 and "--from" not in line:
            *sources, dest = line.split()[1:]
            copies.append((sources, dest))
    return copies


def assemble(dockerfile: Path, out: Path) -> Path:
    """The build stage's WORKDIR after its COPY instructions, written to `out`."""
    context = build_context(ROOT)
    for sources, dest in build_stage_copies(dockerfile):
        for source in sources:
            src = "" if source == "." else source.strip("/")
            under = [f for f in context if not src or f.startswith(src + "/")]
            if under:  # a folder: its contents go into dest
                pairs = [(rel, out / dest / rel[len(src) :].lstrip("/")) for rel in under]
            else:  # a file: into dest when dest is a folder, else as dest
                assert src in context, f"{dockerfile.name}: COPY {source} is not in the build context"
                pairs = [(src, out / dest / Path(src).name if dest.endswith("/") or dest == "." else out / dest)]
            for rel, target in pairs:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, target)
    return out


def first_party_imports(tree: Path) -> set[str]:
    """Top-level names of this repository's packages imported anywhere in `tree` (also lazily)."""
    ours = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    found = set()
    for path in tree.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found & ours


# ---------------------------------------------------------------- tests


def test_dockerignore_rules_follow_docker_semantics():
    rules = dockerignore_rules("**\n!teran/\n!README.md\n**/__pycache__\n**/*.pyc\n")
    assert in_context("teran/model.py", rules) and in_context("teran/data/flickr8k.py", rules)
    assert in_context("README.md", rules)
    assert not in_context("tests/test_x.py", rules) and not in_context("docs/README.md", rules)
    assert not in_context("teran/__pycache__/model.cpython-311.pyc", rules)
    assert not in_context("teran/x.pyc", rules)
    assert in_context("anything", dockerignore_rules("# nothing ignored\n"))


def test_the_pattern_that_broke_the_images_is_caught(tmp_path):
    """The images once left out serving/, which both services import: the import scan finds it."""
    (tmp_path / "search_service").mkdir()
    (tmp_path / "search_service" / "__main__.py").write_text("from serving.runner import run\n")
    assert first_party_imports(tmp_path) == {"serving"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.stem)
def test_build_context_holds_every_package_the_service_imports(dockerfile, tmp_path):
    src = assemble(dockerfile, tmp_path / "src")
    packages = {p.name for p in src.iterdir() if (p / "__init__.py").is_file()}
    service = ENTRYPOINT.search(dockerfile.read_text()).group(1)
    assert service in packages and (src / "pyproject.toml").is_file()
    missing = first_party_imports(src) - packages
    assert not missing, f"{dockerfile.name}: the image's code imports {sorted(missing)}, which its build context leaves out"
    # Nothing the services do not need: no tests, models, data, virtual environments or caches.
    assert not {"tests", "models", "runs", "artifacts", ".venv", "reports"} & {p.name for p in src.iterdir()}
    assert not list(src.rglob("__pycache__"))


def test_images_install_without_torch_and_serve_health(tmp_path):
    """pip install ".[serve]" of the assembled context into a fresh venv, then both entrypoints answer health."""
    trees = [assemble(d, tmp_path / d.stem / "src") for d in DOCKERFILES]
    listing = [sorted(p.relative_to(t).as_posix() for p in t.rglob("*") if p.is_file()) for t in trees]
    assert all(files == listing[0] for files in listing), "the images' build stages copy different files"
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    install = subprocess.run(
        [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", ".[serve]"],
        cwd=trees[0],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    outside = tmp_path / "run"
    outside.mkdir()
    assert subprocess.run([python, "-c", "import torch"], cwd=outside, capture_output=True).returncode != 0
    model_dir = build_synthetic_model_dir(tmp_path / "model")

    with _Service(python, outside, "encoder_service", ["--model-dir", str(model_dir), "--intra-op-threads", "1"]) as encoder:
        assert encoder.health() == "SERVING"
        search_args = ["--milvus-uri", str(tmp_path / "search.db"), "--encoder-address", f"127.0.0.1:{encoder.port}"]
        with _Service(python, outside, "search_service", search_args) as search:
            assert search.health() == "SERVING"
            # the search image also runs the search page (deploy/base/webui.yaml): its static files are installed
            assert _webui_page(python, outside, search.port).startswith(b"<!doctype html>")


def _webui_page(python: str, cwd: Path, search_port: int, timeout: float = 60) -> bytes:
    """Start `python -m webui` of the fresh venv against the search service; its page once /readyz says ready."""
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("TERAN_")}
    command = [python, "-m", "webui", "--host", "127.0.0.1", "--port", str(port), "--search-address", f"127.0.0.1:{search_port}"]
    process = subprocess.Popen(command, cwd=cwd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + timeout
        while time.monotonic() < end and process.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as ready:
                    if ready.status == 200:
                        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as page:
                            return page.read()
            except OSError:
                time.sleep(0.2)
        raise AssertionError("webui did not become ready")
    finally:
        process.terminate()
        process.wait(timeout=30)


class _Service:
    """`python -m MODULE` of the fresh venv, from a folder outside the repository, on a free port."""

    def __init__(self, python: str, cwd: Path, module: str, args: list[str]):
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("TERAN_")}
        command = [python, "-m", module, "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1", *args]
        self.module = module
        self.process = subprocess.Popen(command, cwd=cwd, env=env, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(iter(self.process.stderr.readline, "")), daemon=True).start()
        self.port = self._wait_for_port(120)

    def _wait_for_port(self, timeout: float) -> int:
        end = time.monotonic() + timeout
        while time.monotonic() < end and self.process.poll() is None:
            for line in list(self.lines):
                if line.startswith("{") and json.loads(line).get("msg") == "listening":
                    return int(json.loads(line)["port"])
            time.sleep(0.1)
        raise AssertionError(f"{self.module} did not start:\n" + "".join(self.lines[-40:]))

    def health(self, timeout: float = 120) -> str:
        """The overall grpc.health.v1 status once it is SERVING, or the last one seen at the timeout."""
        status, end = "UNKNOWN", time.monotonic() + timeout
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < end:
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                except grpc.RpcError:
                    status = "UNREACHABLE"
                if status == "SERVING":
                    break
                time.sleep(0.2)
        return status

    def __enter__(self) -> _Service:
        return self

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            assert self.process.wait(30) == 0, "".join(self.lines[-40:])
        finally:
            if self.process.poll() is None:
                self.process.kill()
