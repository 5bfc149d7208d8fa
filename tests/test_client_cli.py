"""The `teran` CLI (client_cli) against real encoder and search servers on loopback (milvus-lite, synthetic model)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import socket
import sys

import grpc
import pytest
from encoder_fixtures import build_synthetic_model_dir, image_bytes, make_config
from search_fixtures import search_config, unique_prefix

from client_cli import main
from client_cli.cli import EXIT_BROKEN_PIPE, caption_metadata, read_captions
from encoder_service.server import ServerThread as EncoderThread
from search_service.logs import LOGGING
from search_service.server import ServerThread as SearchThread
from teran_api.search_client import SearchClient, SearchError
from teran_api.types import SearchQuery

DIM = 16
CAPTIONS = [
    ("dog.jpg", "a dog runs on the beach"),
    ("dog.jpg", "a brown dog, wet from the sea"),
    ("cats.jpg", "two cats sleep on a red sofa"),
    ("boat.jpg", "a boat on a calm lake at sunset"),
]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    model_dir = build_synthetic_model_dir(base / "model", joint_dim=DIM)
    with EncoderThread(make_config(model_dir, max_items=32)) as encoder:
        config = search_config(str(base / "search.db"), encoder.target, collection_prefix=unique_prefix("cli"))
        with SearchThread(config) as search:
            yield {"encoder": encoder.target, "search": search.target, "dir": base}


@pytest.fixture(scope="module")
def indexed(servers):
    """5 images (a directory of 4 + one file) and 4 Flickr8k-style captions, indexed through the CLI."""
    folder = servers["dir"] / "images"
    folder.mkdir()
    for i in range(4):
        (folder / f"img{i}.jpg").write_bytes(image_bytes(seed=i))
    (folder / "notes.txt").write_text("not an image")
    extra = servers["dir"] / "extra.png"
    extra.write_bytes(image_bytes(fmt="PNG", seed=9))
    csv_path = servers["dir"] / "captions.txt"
    csv_path.write_text("image,caption\n" + "".join(f'{name},"{text}"\n' for name, text in CAPTIONS))
    s = servers["search"]
    images = ["index", "--search", s, "--images", str(folder), str(extra), "--batch", "2", "--metadata", '{"k": 1}', "--json"]
    return {
        "folder": folder,
        "extra": extra,
        "images_run": run_captured(images),
        "captions_run": run_captured(["index", "--search", s, "--captions", str(csv_path)]),
    }


def run_captured(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_index_images_and_captions(servers, indexed, capsys):
    s = servers["search"]
    code, out, err = indexed["images_run"]
    assert code == 0, err
    summary = json.loads(out)
    assert (summary["indexed"], summary["images"], summary["captions"]) == (5, 5, 0)
    assert summary["seconds"] >= 0 and "sent 5/5" in err
    code, out, err = indexed["captions_run"]
    assert code == 0, err
    assert out.startswith("indexed 4 items (0 images, 4 captions)")

    code, out, err = run(capsys, "stats", "--search", s, "--json")
    assert code == 0, err
    stats = json.loads(out)
    assert (stats["images"], stats["captions"]) == (5, 4) and stats["model"]["dimension"] == DIM
    code, out, err = run(capsys, "get", "--search", s, "--modality", "caption", "--ids", "dog.jpg#1", "nope", "--json")
    assert code == 0, err
    items = json.loads(out)["items"]
    assert [i["found"] for i in items] == [True, False] and items[0]["num_concepts"] > 0
    assert items[0]["metadata"] == {"text": "a brown dog, wet from the sea"}  # the caption's text goes with it


def test_caption_metadata():
    assert caption_metadata({"split": "test"}, "a dog") == {"text": "a dog", "split": "test"}
    assert caption_metadata({"text": "mine"}, "a dog") == {"text": "mine"}  # the user's own key wins


def test_search_by_caption_and_image(servers, indexed, capsys):
    s = servers["search"]
    code, out, err = run(capsys, "search", "--search", s, "--caption", "a dog on the beach", "--top-k", "3", "--explain", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["target"] == "IMAGE" and doc["reranked"] and doc["query_word_pieces"]
    hits = doc["hits"]
    assert len(hits) == 3 and [h["rank"] for h in hits] == [1, 2, 3]
    assert {h["id"] for h in hits} <= {f"img{i}.jpg" for i in range(4)} | {"extra.png"}
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert all(h["metadata"] == {"k": 1} for h in hits)
    assert doc["ranking"] == "MrSw"  # the test model has no blend weight
    for h in hits:
        # The content words of the query, each at its best region (stop words left out).
        assert [(a["word"], a["piece_indices"]) for a in h["alignment"]] == [("dog", [1]), ("beach", [4])]
        assert all(len(a["box"]) == 4 and -1.0 <= a["similarity"] <= 1.0 for a in h["alignment"])

    code, out, err = run(capsys, "search", "--search", s, "--image", str(indexed["folder"] / "img0.jpg"), "--no-rerank", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["target"] == "CAPTION" and not doc["reranked"]
    assert sorted(h["id"] for h in doc["hits"]) == ["boat.jpg#0", "cats.jpg#0", "dog.jpg#0", "dog.jpg#1"]
    assert all("alignment" not in h for h in doc["hits"])
    assert [h["score"] for h in doc["hits"]] == sorted((h["score"] for h in doc["hits"]), reverse=True)
    code, out, err = run(capsys, "search", "--search", s, "--image", str(indexed["folder"] / "img0.jpg"), "--no-rerank")
    assert code == 0, err
    assert "-> 4 caption hits (" in out and 'dog.jpg#1  "a brown dog, wet from the sea"  score ' in out
    assert '"text"' not in out  # shown once, not again in the metadata

    code, out, err = run(capsys, "search", "--search", s, "--caption", "two cats", "--filter", 'id == "img1.jpg"', "--explain")
    assert code == 0, err
    assert "img1.jpg" in out and "score" in out and "-> region" in out and "img2.jpg" not in out


def test_delete(servers, indexed, capsys):
    s = servers["search"]
    code, out, err = run(capsys, "index", "--search", s, "--captions", str(_id_csv(servers["dir"])))
    assert code == 0, err
    code, out, err = run(capsys, "delete", "--search", s, "--modality", "caption", "--ids", "tmp1", "tmp2", "--json")
    assert code == 0, err
    assert json.loads(out) == {"deleted": 1, "not_found": ["tmp2"]}


def _id_csv(folder):
    path = folder / "ids.csv"
    path.write_text("id,caption\ntmp1,a temporary caption\n")
    return path


def test_encode(servers, indexed, capsys):
    e = servers["encoder"]
    code, out, err = run(capsys, "encode", "--encoder", e, "--caption", "a dog", "two cats on a sofa", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["model"]["dimension"] == DIM and len(doc["items"]) == 2
    for item in doc["items"]:
        assert len(item["global_vector"]) == DIM and item["norm"] == pytest.approx(1.0, abs=1e-4)
        assert len(item["concepts"]) == item["num_concepts"] == len(item["word_pieces"]) > 0
    code, out, err = run(capsys, "encode", "--encoder", e, "--image", str(indexed["extra"]), "--dtype", "float16", "--json")
    assert code == 0, err
    item = json.loads(out)["items"][0]
    assert len(item["boxes"]) == item["num_concepts"] == len(item["concepts"]) > 0 and len(item["global_vector"]) == DIM
    code, out, err = run(capsys, "encode", "--encoder", e, "--image", str(indexed["folder"] / "img1.jpg"))
    assert code == 0, err
    assert f"dim {DIM}" in out and "concepts" in out and "region 0" in out


def test_rpc_errors_and_bad_input(servers, indexed, capsys, tmp_path):
    code, out, err = run(capsys, "search", "--search", servers["search"], "--caption", "")
    assert code == 1 and err.startswith("error: INVALID_ARGUMENT: ") and "Traceback" not in err
    code, _, err = run(capsys, "search", "--search", servers["search"], "--caption", "x", "--filter", "global_vector > 1")
    assert code == 1 and "INVALID_ARGUMENT" in err
    with socket.socket() as sock:  # a free port with nothing listening
        sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{sock.getsockname()[1]}"
    code, _, err = run(capsys, "stats", "--search", dead, "--timeout", "5")
    assert code == 1 and err.startswith("error: UNAVAILABLE: ")
    assert f"hint: cannot reach the search service at {dead} (is it running? start it with `python -m search_service " in err
    assert "pass --search HOST:PORT or set TERAN_SEARCH_ADDRESS" in err
    code, _, err = run(capsys, "encode", "--encoder", dead, "--timeout", "5", "--caption", "x")
    assert code == 1 and err.startswith("error: UNAVAILABLE: ")
    assert f"hint: cannot reach the encoder service at {dead}" in err and "--encoder HOST:PORT or set TERAN_ENCODER_ADDRESS" in err
    # each service's address given for the other
    code, _, err = run(capsys, "stats", "--search", servers["encoder"])
    assert code == 1 and err.startswith("error: UNIMPLEMENTED: ")
    assert f"hint: the service at {servers['encoder']} is not a teran.v1.SearchService (the encoder service's address, maybe?)" in err
    code, _, err = run(capsys, "encode", "--encoder", servers["search"], "--caption", "x")
    assert code == 1 and "is not a teran.v1.EncoderService (the search service's address, maybe?); pass --encoder" in err
    # usage / bad input: exit 2, nothing sent
    code, _, err = run(capsys, "search", "--search", dead, "--image", str(tmp_path / "missing.jpg"))
    assert code == 2 and "cannot read" in err
    code, _, err = run(capsys, "index", "--search", dead, "--images", str(tmp_path))
    assert code == 2 and "no image files" in err
    text = indexed["folder"] / "notes.txt"
    for argv in (("search", "--search"), ("index", "--search"), ("encode", "--encoder")):
        code, _, err = run(capsys, *argv, dead, "--images" if argv[0] == "index" else "--image", str(text))
        assert code == 2 and err.endswith(f": error: {text}: not a JPEG, PNG or WebP image\n"), err
    for argv in (["search"], ["search", "--caption", "a", "--image", "b"], ["index", "--images", "x", "--metadata", "[1]"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    capsys.readouterr()


@pytest.mark.parametrize("command", [None, "search", "index", "encode", "stats", "get", "delete"])
def test_help(command, capsys, monkeypatch):
    monkeypatch.setenv("TERAN_SEARCH_ADDRESS", "search.example:1234")
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"] if command else ["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: teran")
    if command in ("search", "index", "stats", "get", "delete"):
        assert "search.example:1234" in out and "--token" in out and "--json" in out


def test_read_captions_formats(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("a.jpg,one, with comma\na.jpg,two\nb.jpg,three\n")
    assert read_captions(path) == [("a.jpg#0", "one, with comma"), ("a.jpg#1", "two"), ("b.jpg#0", "three")]
    path.write_text("x1,first\nx2,second\n")
    assert read_captions(path) == [("x1", "first"), ("x2", "second")]


def test_non_image_refused_by_the_encoder(servers):
    """Past the CLI's own check (a GIF): the encoder's refusal names the accepted formats, not Pillow's buffer."""
    with SearchClient(servers["search"]) as client, pytest.raises(SearchError) as info:
        client.search(SearchQuery(image_bytes(fmt="GIF")))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details == "image.encoded: not a decodable image of the allowed formats JPEG/PNG/WEBP"


def test_empty_store_hints_and_counts(servers, capsys):
    """A search of a modality with nothing indexed says so and how to index some; counts are singular when 1."""
    config = search_config(str(servers["dir"] / "search.db"), servers["encoder"], collection_prefix=unique_prefix("empty"))
    image = servers["dir"] / "query.png"
    image.write_bytes(image_bytes(fmt="PNG", seed=3))
    with SearchThread(config) as search:
        s = search.target
        code, out, err = run(capsys, "search", "--search", s, "--image", str(image))
        assert code == 0 and "-> 0 caption hits (0 candidates" in out
        assert err == "hint: no captions are indexed in this search service; index some with `teran index --captions FILE`\n"
        code, out, err = run(capsys, "index", "--search", s, "--captions", str(_id_csv(servers["dir"])))
        assert code == 0 and out.startswith("indexed 1 item (0 images, 1 caption) in ") and "sent 1/1 item (100%)" in err
        code, out, err = run(capsys, "search", "--search", s, "--image", str(image))
        assert code == 0 and "-> 1 caption hit (1 candidate, " in out and 'tmp1  "a temporary caption"' in out and not err
        code, out, err = run(capsys, "search", "--search", s, "--caption", "a dog", "--json")
        assert code == 0 and json.loads(out)["hits"] == []
        assert err == "hint: no images are indexed in this search service; index some with `teran index --images FILE_OR_DIR`\n"


def test_closed_stdout_ends_quietly(servers, capsys, monkeypatch):
    """`teran stats | head -3`: the reader is gone; no BrokenPipeError traceback, the status of SIGPIPE."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    with open(write_end, "w") as closed_pipe:
        monkeypatch.setattr(sys, "stdout", closed_pipe)
        assert main(["stats", "--search", servers["search"]]) == EXIT_BROKEN_PIPE
        print("more output")  # stdout now goes to /dev/null: writing on does not fail
    monkeypatch.undo()
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("args", [["--help"], ["search", "--help"]])
@pytest.mark.parametrize("unbuffered", ["1", ""])
def test_help_into_a_closed_pipe_ends_like_sigpipe(args, unbuffered):
    """`teran --help | true`: argparse ignores a failed write of its help (exit 0); the CLI ends with
    the status of SIGPIPE, as for a command's own output, buffered or not, without a traceback."""
    import subprocess

    read_end, write_end = os.pipe()
    os.close(read_end)
    env = {**os.environ, "PYTHONUNBUFFERED": unbuffered}
    try:
        done = subprocess.run([sys.executable, "-m", "client_cli", *args], stdout=write_end, stderr=subprocess.PIPE, env=env, timeout=60)
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (EXIT_BROKEN_PIPE, b"")


def test_option_typo_shows_the_command_usage_and_a_suggestion(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["search", "--topk", "5", "--caption", "a dog"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: teran search ") and "--top-k" in err.split("error:")[0]
    assert err.rstrip().endswith("teran search: error: unrecognized arguments: --topk 5 (did you mean --top-k?)")


@contextlib.contextmanager
def search_logs_captured():
    """The search service's logging set up as `python -m search_service` does, into a StringIO; then as it was."""
    names = (LOGGING.logger_name, *LOGGING.adopted, *(name for name, _ in LOGGING.filters))
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).propagate, logging.getLogger(n).level) for n in names}
    saved_filters = {name: logging.getLogger(name).filters[:] for name, _ in LOGGING.filters}
    stream = io.StringIO()
    LOGGING.setup_logging("info", "json", stream)
    try:
        yield stream
    finally:
        for name, (handlers, propagate, level) in saved.items():
            logger = logging.getLogger(name)
            logger.handlers[:], logger.propagate = handlers, propagate
            logger.setLevel(level)
        for name, filters in saved_filters.items():
            logging.getLogger(name).filters[:] = filters


def test_bad_filter_logs_one_json_line_without_traceback(servers, indexed, capsys):
    """Milvus refuses the filter (past the service's own name check): the service logs the failed call as
    one JSON line, and pymilvus's record of the failed query (a traceback) is not logged at INFO."""
    with search_logs_captured() as logs:
        code, _, err = run(capsys, "search", "--search", servers["search"], "--caption", "x", "--filter", 'metadata["k"] >>> 1')
    assert code == 1 and err.startswith("error: INVALID_ARGUMENT: filter: ")
    entries = [json.loads(line) for line in logs.getvalue().splitlines()]  # every line one JSON object
    assert "Traceback" not in logs.getvalue()
    assert not [e for e in entries if e["level"] == "ERROR" or e["logger"].startswith("pymilvus")]
    failed = [e for e in entries if e.get("code") == "INVALID_ARGUMENT"]
    assert len(failed) == 1 and failed[0]["level"] == "WARNING" and failed[0]["msg"].startswith("Search failed: INVALID_ARGUMENT filter: ")
