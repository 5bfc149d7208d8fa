"""The shape of the tree: code outside tests/ never reaches into tests/ (test helpers are not part of
the product; what a benchmark and a test both need lives in a product package, e.g.
demo.milvus_standalone)."""

from __future__ import annotations

import ast
from pathlib import Path

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
