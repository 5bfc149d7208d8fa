import json
import pickle

import numpy as np
import pytest

from teran.data.bottom_up import BottomUpFeatures, load_coco_sizes, load_flickr30k_sizes
from teran.errors import FeatureShapeError, TeranInputError


@pytest.fixture()
def features_36(tmp_path):
    root = tmp_path / "features_36"
    (root / "bu_att").mkdir(parents=True)
    (root / "bu_box").mkdir()
    rng = np.random.default_rng(0)
    for image_id in ("42", "7"):
        np.savez(root / "bu_att" / f"{image_id}.npz", feat=rng.random((36, 2048), dtype=np.float32))
        boxes = np.tile(np.array([[10, 20, 110, 220]], np.float32), (36, 1))
        np.save(root / "bu_box" / f"{image_id}.npy", boxes)
    return root


def test_coco_layout_loads_and_normalises_boxes(features_36, tmp_path):
    annotations = tmp_path / "captions_val2014.json"
    annotations.write_text(json.dumps({"images": [{"id": 42, "width": 200, "height": 400}, {"id": 7, "width": 100, "height": 100}]}))
    reader = BottomUpFeatures(features_36, load_coco_sizes(annotations))
    features, boxes = reader.load(42)
    assert features.shape == (36, 2048) and features.dtype == np.float32
    np.testing.assert_allclose(boxes[0], [0.05, 0.05, 0.55, 0.55])
    gallery = reader.image_features(["42", "7"])
    assert gallery.regions.shape == (2, 36, 2048) and gallery.boxes.shape == (2, 36, 4)
    np.testing.assert_allclose(gallery.boxes[1, 0], [0.1, 0.2, 1.1, 2.2], rtol=1e-6)


def test_flickr30k_sizes_pickle_and_refusal_of_objects(tmp_path):
    sizes = tmp_path / "sizes.pkl"
    sizes.write_bytes(pickle.dumps([(500, 375), (333, 500)]))
    assert load_flickr30k_sizes(sizes) == {"0": (500, 375), "1": (333, 500)}
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps([np.int64(3)]))  # needs a global: refused, nothing is executed
    with pytest.raises(TeranInputError, match="evil.pkl: not a pickled list"):
        load_flickr30k_sizes(evil)


def test_bad_feature_files_name_the_file(features_36):
    reader = BottomUpFeatures(features_36, {"42": (100, 100), "7": (100, 100), "9": (1, 1)})
    np.savez(features_36 / "bu_att" / "7.npz", feat=np.zeros((10, 2048), np.float32))
    with pytest.raises(FeatureShapeError, match=r"7.npz: features have shape \(10, 2048\), expected \(36, 2048\)"):
        reader.load("7")
    with pytest.raises(TeranInputError, match="9.npz: feature file does not exist"):
        reader.load("9")
    np.save(features_36 / "bu_box" / "42.npy", np.full((36, 4), np.nan, np.float32))
    with pytest.raises(FeatureShapeError, match="non-finite"):
        reader.load("42")
    with pytest.raises(TeranInputError, match="no bu_att/ folder"):
        BottomUpFeatures(features_36.parent, {})
