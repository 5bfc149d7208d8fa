"""The shape of the tree: the services meet only in the shared API package (teran_api: generated
protobuf code, tensor codec, typed clients), whose generated code is up to date; code outside
tests/ never reaches into tests/ (what a benchmark and a test both need lives in a product package,
e.g. demo.milvus_standalone)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
SKIPPED = {".venv", "tests", "node_modules", ".git", "artifacts", "runs", "models"}


def product_files() -> list[Path]:
    return sorted(
        path
        for path in ROOT.rglob("*.py")
        if not (set(path.relative_to(ROOT).parts[:-1]) & SKIPPED) and not path.name.endswith(("_pb2.py", "_pb2_grpc.py"))
    )


def test_no_file_outside_tests_imports_from_tests():
    helpers = {path.stem for path in TESTS.glob("*.py")} | {"tests"}
    offenders = []
    for path in product_files():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}: import {n}" for n in names if n.split(".")[0] in helpers]
        text = path.read_text(encoding="utf-8")
        if 'ROOT / "tests"' in text and "sys.path" in text:
            offenders.append(f"{path.relative_to(ROOT)}: puts tests/ on sys.path")
    walked = {str(p.relative_to(ROOT)) for p in product_files()}
    assert {"bench/bench_search.py", "demo/milvus_standalone.py", "search_service/server.py"} <= walked, "the walk misses files"
    assert not offenders, offenders


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("search_service", "encoder_service"),
        ("encoder_service", "search_service"),
        ("teran_api", "encoder_service"),
        ("teran_api", "search_service"),
    ],
)
def test_packages_meet_only_in_the_api_package(package, forbidden):
    offenders = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for name in imported_modules(path)
        if name.split(".")[0] == forbidden
    ]
    assert (ROOT / package).is_dir() and not offenders, offenders


def test_generated_code_is_up_to_date(tmp_path):
    sys.path.insert(0, str(ROOT / "proto"))
    try:
        import generate
    finally:
        sys.path.remove(str(ROOT / "proto"))
    generate.generate(tmp_path / "gen")
    assert generate.compare(tmp_path / "gen", ROOT / "teran_api" / "_proto") == [], "run: python proto/generate.py"
    result = subprocess.run([sys.executable, "proto/generate.py", "--check"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
