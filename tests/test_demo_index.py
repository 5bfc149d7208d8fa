"""demo.__main__.index_split: unary batches, progress counted from what the server stored, caption text in metadata."""

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import demo.__main__ as demo_main
from teran_api.types import IndexResult, Modality


@dataclass
class FakeData:
    root: Path
    names: list[str]
    captions: list[list[str]]

    def image_path(self, index: int) -> Path:
        return self.root / self.names[index]

    def flat_captions(self):
        texts, owners = [], []
        for index, caps in enumerate(self.captions):
            texts.extend(caps)
            owners.extend([index] * len(caps))
        return texts, owners


@dataclass
class FakeClient:
    events: list
    batches: list = field(default_factory=list)
    stored: dict = field(default_factory=lambda: {"images": 0, "captions": 0})
    metadata: dict = field(default_factory=dict)  # caption id -> stored metadata

    def stats(self):
        return SimpleNamespace(images=self.stored["images"], captions=self.stored["captions"], uri="fake.db")

    def index(self, items):
        items = list(items)
        self.batches.append(items)
        kind = "images" if isinstance(items[0].content, bytes) else "captions"
        self.stored[kind] += len(items)
        self.metadata.update({i.id: json.loads(i.metadata_json) for i in items if kind == "captions"})
        self.events.append(("stored", kind, len(items)))
        return IndexResult(indexed=len(items), images=0, captions=0, model=None)

    def get(self, modality, ids):
        assert modality == Modality.CAPTION
        return [SimpleNamespace(id=i, found=i in self.metadata, metadata=self.metadata.get(i)) for i in ids]

    def stream_index(self, *args, **kwargs):  # pragma: no cover - the demo must not use it
        raise AssertionError("index_split must index batch by batch with the unary call")


class RecordingBar:
    def __init__(self, events, total, desc, unit):
        self.events, self.desc = events, desc

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n):
        self.events.append(("bar", self.desc, n))


def _setup(tmp_path, monkeypatch, photos=70):
    names = [f"p{i}.jpg" for i in range(photos)]
    for name in names:
        (tmp_path / name).write_bytes(b"\xff\xd8" + name.encode())
    data = FakeData(tmp_path, names, [[f"caption {c} of {name}" for c in range(5)] for name in names])
    events: list = []
    monkeypatch.setattr(demo_main, "tqdm", lambda total, desc, unit: RecordingBar(events, total, desc, unit))
    monkeypatch.setattr(demo_main, "log", lambda message: events.append(("log", message)))
    return data, FakeClient(events), events


def test_bars_count_what_each_call_stored(tmp_path, monkeypatch):
    data, client, events = _setup(tmp_path, monkeypatch)
    demo_main.index_split(client, data)
    steps = [e for e in events if e[0] in ("stored", "bar")]
    # every bar update follows the call that stored those items, with the count the server returned
    assert steps[0::2] == [("stored", "images", 32), ("stored", "images", 32), ("stored", "images", 6)] + [
        ("stored", "captions", 128),
        ("stored", "captions", 128),
        ("stored", "captions", 94),
    ]
    assert steps[1::2] == [("bar", "index photos", n) for n in (32, 32, 6)] + [("bar", "index captions", n) for n in (128, 128, 94)]
    assert client.stored == {"images": 70, "captions": 350}


def test_metadata_of_photos_and_captions(tmp_path, monkeypatch):
    data, client, _ = _setup(tmp_path, monkeypatch, photos=3)
    demo_main.index_split(client, data)
    photos, captions = client.batches
    assert [(i.id, json.loads(i.metadata_json)) for i in photos] == [(n, {"caption": f"caption 0 of {n}"}) for n in data.names]
    assert photos[1].content == (tmp_path / "p1.jpg").read_bytes()
    assert captions[6].id == "p1.jpg#1" and captions[6].content == "caption 1 of p1.jpg"
    assert json.loads(captions[6].metadata_json) == {"image": "p1.jpg", "text": "caption 1 of p1.jpg"}


def test_reuses_a_complete_index(tmp_path, monkeypatch):
    data, client, events = _setup(tmp_path, monkeypatch, photos=3)
    demo_main.index_split(client, data)
    client.batches.clear()
    demo_main.index_split(client, data)
    assert client.batches == [] and events[-1][0] == "log" and "reusing 3 photos and 15 captions" in events[-1][1]


def test_captions_stored_without_their_text_are_indexed_again(tmp_path, monkeypatch):
    data, client, events = _setup(tmp_path, monkeypatch, photos=3)
    client.stored = {"images": 3, "captions": 15}  # an index written before the captions' metadata held their text
    client.metadata = {f"{n}#{c}": {"image": n} for n in data.names for c in range(5)}
    demo_main.index_split(client, data)
    assert [len(b) for b in client.batches] == [15] and all(isinstance(i.content, str) for i in client.batches[0])
    assert client.metadata["p2.jpg#4"] == {"image": "p2.jpg", "text": "caption 4 of p2.jpg"}
    assert ("bar", "index captions", 15) in events and not any(e[:2] == ("bar", "index photos") for e in events)
