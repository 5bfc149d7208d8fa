"""The hub penalty (teran.hubness): the statistic, the served matrix, and how a reference travels
(checkpoint, model directory, manifest)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from teran.hubness import HubReference, hub_statistic, penalised, penalised_matrix
from teran.manifest import ManifestError, load_manifest


def unit(rng, *shape):
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_hub_statistic_is_the_mean_of_the_k_best_cosines():
    rng = np.random.default_rng(0)
    items, bank = unit(rng, 7, 12), unit(rng, 30, 12)
    expected = np.sort(items @ bank.T, axis=1)[:, -4:].mean(axis=1)
    np.testing.assert_allclose(hub_statistic(items, bank, 4), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(hub_statistic(items, bank, 4, chunk=2), expected, rtol=1e-6, atol=1e-6)  # chunking changes nothing
    np.testing.assert_allclose(hub_statistic(items, bank, 100), (items @ bank.T).mean(axis=1), rtol=1e-5, atol=1e-6)  # k capped
    assert hub_statistic(items[0], bank, 1)[0] == pytest.approx(float((items[0] @ bank.T).max()), abs=1e-6)


def test_a_vector_close_to_many_reference_items_gets_the_larger_statistic():
    rng = np.random.default_rng(1)
    bank = unit(rng, 50, 8)
    centre = bank.mean(axis=0) / np.linalg.norm(bank.mean(axis=0))  # near everything: a hub
    loner = -centre
    stats = hub_statistic(np.stack([centre, loner]), bank, 10)
    assert stats[0] > stats[1]


def test_penalised_matrix_ranks_each_direction_as_the_service_does():
    """Per caption (ranking photos) only the photos' penalties matter, per photo only the captions': the one
    matrix gives the same orders as penalising the candidates of each query alone."""
    rng = np.random.default_rng(2)
    scores = rng.standard_normal((6, 9)).astype(np.float32)
    image_hub, caption_hub = rng.random(6).astype(np.float32), rng.random(9).astype(np.float32)
    matrix = penalised_matrix(scores, image_hub, caption_hub, 0.5)
    for caption in range(9):
        service = penalised(scores[:, caption], image_hub, 0.5)
        assert list(np.argsort(-matrix[:, caption])) == list(np.argsort(-service))
    for image in range(6):
        service = penalised(scores[image], caption_hub, 0.5)
        assert list(np.argsort(-matrix[image])) == list(np.argsort(-service))
    np.testing.assert_allclose(penalised(np.ones(3), np.array([0.0, 0.2, 0.4]), 0.5), [1.0, 0.9, 0.8], rtol=1e-6)


def test_reference_uses_the_other_modality_and_round_trips():
    rng = np.random.default_rng(3)
    ref = HubReference(unit(rng, 5, 8), unit(rng, 20, 8), k=2, weight=0.25)
    items = unit(rng, 3, 8)
    np.testing.assert_allclose(ref.statistic(items, items_are_images=True), hub_statistic(items, ref.captions, 2), atol=1e-6)
    np.testing.assert_allclose(ref.statistic(items, items_are_images=False), hub_statistic(items, ref.images, 2), atol=1e-6)
    back = HubReference.from_checkpoint({"hub_reference": ref.to_checkpoint()})
    assert (back.k, back.weight) == (2, 0.25)
    np.testing.assert_allclose(back.captions, ref.captions, atol=1e-3)  # stored as fp16
    assert HubReference.from_checkpoint({}) is None


def test_reference_refuses_bad_shapes():
    rng = np.random.default_rng(4)
    with pytest.raises(ValueError, match="dimension"):
        HubReference(unit(rng, 5, 8), unit(rng, 5, 6))
    with pytest.raises(ValueError, match="non-empty"):
        HubReference(np.zeros((0, 8), np.float32), unit(rng, 5, 8))
    with pytest.raises(ValueError, match="k must be"):
        HubReference(unit(rng, 5, 8), unit(rng, 5, 8), k=0)


def test_model_directory_carries_the_reference_with_checksums(tmp_path):
    from encoder_fixtures import build_synthetic_model_dir

    rng = np.random.default_rng(5)
    ref = HubReference(unit(rng, 6, 8), unit(rng, 12, 8), k=3, weight=0.5)
    out = build_synthetic_model_dir(tmp_path / "m", joint_dim=8, blend_weight=0.1, hub_reference=ref)
    manifest = load_manifest(out, verify=True)
    assert manifest.hub_penalty["k"] == 3 and manifest.hub_penalty["weight"] == 0.5
    assert manifest.hub_penalty["caption_reference"] in manifest.files  # checksummed like every file
    loaded = HubReference.load(out, manifest.hub_penalty)
    np.testing.assert_allclose(loaded.images, ref.images, atol=1e-3)
    (out / manifest.hub_penalty["image_reference"]).write_bytes(b"changed")
    with pytest.raises(ManifestError, match="hub-reference-images.npy"):
        load_manifest(out, verify=True)


def test_manifest_refuses_a_malformed_hub_penalty(tmp_path):
    from encoder_fixtures import build_synthetic_model_dir

    rng = np.random.default_rng(6)
    out = build_synthetic_model_dir(tmp_path / "m", joint_dim=8, hub_reference=HubReference(unit(rng, 4, 8), unit(rng, 4, 8)))
    path = out / "manifest.json"
    good = json.loads(path.read_text())
    for change, field in (({"k": 0}, "hub_penalty.k"), ({"weight": -1}, "hub_penalty.weight"), ({"image_reference": "x.npy"}, "x.npy")):
        path.write_text(json.dumps({**good, "hub_penalty": {**good["hub_penalty"], **change}}))
        with pytest.raises(ManifestError, match=field.replace(".", r"\.")):
            load_manifest(out, verify=False)


def test_store_keeps_each_items_statistic_and_reads_old_collections_without_one(tmp_path):
    """Schema format 3 stores `hub` per row and returns it with the first stage; collections created
    before it (no `hub` field) still take writes and searches, with statistic 0."""
    from search_service.layout import IMAGES, ModelRef
    from search_service.store import Item, MilvusStore

    rng = np.random.default_rng(7)
    model = ModelRef("m", 1, 8)
    items = [Item(f"i{n}", unit(rng, 8), unit(rng, 3, 8), {}, hub=0.25 * n) for n in range(3)]

    def opened(prefix: str) -> MilvusStore:
        store = MilvusStore(str(tmp_path / "hub.db"), prefix=prefix, index_type="FLAT")
        store.open()
        return store

    store = opened("new")
    store.ensure(model)
    store.upsert(IMAGES, items)
    hits = store.search(IMAGES, items[2].global_vector, 3, concepts=False)
    assert {h.id: h.hub for h in hits} == {"i0": 0.0, "i1": 0.25, "i2": 0.5}
    store.close()
    reopened = opened("new")
    assert reopened.hub_field and reopened.get(IMAGES, ["i1"])["i1"].hub == 0.25
    reopened.close()

    old = opened("old")
    old.layout.hub_field = False  # as collections of schema format 2 were created
    old.layout.chunks, old.layout.stamped = 1, True
    old.layout._create_missing(old.client, model)
    old.close()
    old = opened("old")
    assert not old.hub_field
    old.upsert(IMAGES, items)
    assert {h.id: h.hub for h in old.search(IMAGES, items[0].global_vector, 3, concepts=False)} == {"i0": 0.0, "i1": 0.0, "i2": 0.0}
    old.close()
