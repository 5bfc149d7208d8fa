"""Bad input: captions, images, data folders and configs give clear errors naming the problem."""

import io

import numpy as np
import pytest
from PIL import Image

from teran import backbones
from teran.config import load_train_config
from teran.data.flickr8k import load_split, read_captions
from teran.errors import CaptionError, ImageDecodeError, TeranInputError
from teran.preprocess import ImageLimits, PixelSpec, decode_image, grid_boxes, read_image_file, to_pixels
from teran.tokenization import CaptionTokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return CaptionTokenizer(backbones.tokenizer_file(), max_tokens=12, max_chars=80)


def _png(width, height):
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_tokenizer_pads_and_masks(tokenizer):
    batch = tokenizer.encode(["a dog", "two dogs run on grass"])
    assert batch.tokens[0] == ["[CLS]", "a", "dog", "[SEP]"]
    assert batch.input_ids.shape == batch.attention_mask.shape == (2, len(batch.tokens[1]))
    assert batch.attention_mask[0].tolist() == [1, 1, 1, 1] + [0] * (len(batch.tokens[1]) - 4)


@pytest.mark.parametrize(
    "caption, message", [("", "empty caption"), ("   ", "empty caption"), ("x" * 81, "81 characters exceeds the limit of 80")]
)
def test_tokenizer_rejects_empty_and_overlong(tokenizer, caption, message):
    with pytest.raises(CaptionError, match=message):
        tokenizer.encode(["fine", caption])


def test_tokenizer_word_piece_limit_and_truncation(tokenizer):
    long = "one two three four five six seven eight nine ten eleven twelve"
    with pytest.raises(CaptionError, match="caption 0: 14 word pieces exceeds the limit of 12"):
        tokenizer.encode([long])
    batch = tokenizer.encode([long], truncate=True)
    assert len(batch.tokens[0]) == 12 and batch.tokens[0][-1] == "[SEP]"


def test_decode_rejects_garbage_empty_and_bombs():
    with pytest.raises(ImageDecodeError, match="upload.jpg: not a decodable"):
        decode_image(b"not an image at all", source="upload.jpg")
    with pytest.raises(ImageDecodeError, match="empty image data"):
        decode_image(b"")
    with pytest.raises(ImageDecodeError, match="exceeds the limit of 1000 pixels"):
        decode_image(_png(100, 100), limits=ImageLimits(max_pixels=1000))
    with pytest.raises(ImageDecodeError, match="exceeds the limit of 10 bytes"):
        decode_image(_png(4, 4), limits=ImageLimits(max_bytes=10))
    truncated = _png(64, 64)[:60]
    with pytest.raises(ImageDecodeError):
        decode_image(truncated, source="cut.png")


def test_missing_image_file_names_the_path(tmp_path):
    with pytest.raises(ImageDecodeError, match="nope.jpg: image file does not exist"):
        read_image_file(tmp_path / "nope.jpg")


def test_pixels_and_grid_boxes():
    pixels = to_pixels(decode_image(_png(300, 120)), PixelSpec())
    assert pixels.shape == (3, 224, 224) and pixels.dtype == np.float32
    boxes = grid_boxes(7)
    assert boxes.shape == (49, 4)
    np.testing.assert_allclose(boxes[0], [0, 0, 1 / 7, 1 / 7], atol=1e-6)
    np.testing.assert_allclose(boxes[8], [1 / 7, 1 / 7, 2 / 7, 2 / 7], atol=1e-6)
    np.testing.assert_allclose(boxes[-1], [6 / 7, 6 / 7, 1, 1], atol=1e-6)


def test_captions_csv_splits_on_first_comma(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text("image,caption\na.jpg,A dog , running, fast .\na.jpg,second\n")
    assert read_captions(path) == {"a.jpg": ["A dog , running, fast .", "second"]}
    path.write_text("img,text\n")
    with pytest.raises(TeranInputError, match="expected header 'image,caption'"):
        read_captions(path)


def test_data_dir_errors(tmp_path):
    with pytest.raises(TeranInputError, match="no images/ folder"):
        load_split("dev", tmp_path)
    (tmp_path / "images").mkdir()
    (tmp_path / "captions.txt").write_text("image,caption\na.jpg,x\n")
    with pytest.raises(TeranInputError, match="unknown split 'val'"):
        load_split("val", tmp_path)
    (tmp_path / "dev_images.txt").write_text("a.jpg\nb.jpg\n")
    with pytest.raises(TeranInputError, match="1 images of split 'dev' have no captions, e.g. b.jpg"):
        load_split("dev", tmp_path)


def test_config_rejects_unknown_settings(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 2\nmodel:\n  joint_dim: 64\n  bogus: 1\n")
    with pytest.raises(TeranInputError, match=r"unknown setting\(s\) \['bogus'\]"):
        load_train_config(path)
    path.write_text("epochs: 2\nmodel:\n  joint_dim: 64\n")
    cfg = load_train_config(path, {"seed": 5})
    assert cfg.model.joint_dim == 64 and cfg.epochs == 2 and cfg.seed == 5


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "PPM", "ICO"])
def test_only_the_allowed_image_formats_are_decoded(fmt):
    """Real images of other formats never reach their Pillow decoders; opting a format in works."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buffer, format=fmt)
    with pytest.raises(ImageDecodeError, match=r"x: not a decodable image of the allowed formats JPEG/PNG/WEBP"):
        decode_image(buffer.getvalue(), source="x")
    image = decode_image(buffer.getvalue(), limits=ImageLimits(formats=("JPEG", fmt)))
    assert image.size == (16, 16) and image.getpixel((3, 3))[0] > 150
