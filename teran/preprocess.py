"""Image decoding and pixel preprocessing shared by training and serving (torch-free).

The image backbone sees a fixed square input: the picture is squashed (no crop) to
`size` x `size` so every grid cell maps back to a box of the original picture.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from teran.errors import ImageDecodeError


@dataclass(frozen=True)
class PixelSpec:
    """Constants the backbone was trained with; exported into the model manifest."""

    size: int = 224
    # EfficientNet-Lite was trained on (x - 127) / 128 in 0..255 units.
    mean: tuple[float, float, float] = (127.0 / 255, 127.0 / 255, 127.0 / 255)
    std: tuple[float, float, float] = (128.0 / 255, 128.0 / 255, 128.0 / 255)
    resample: str = "bilinear"


@dataclass(frozen=True)
class ImageLimits:
    """Limits applied before any pixel is decoded (decompression-bomb guard)."""

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_side: int = 16384
    # Pillow format names tried when decoding; every other decoder (GIF, TIFF, BMP, ...) stays unreachable.
    formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP")


def decode_image(data: bytes, source: str = "image", limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Decode image bytes of one of `limits.formats` (JPEG/PNG/WebP) to an RGB PIL image, enforcing `limits`.

    `source` names the file or request field in error messages.
    """
    if not data:
        raise ImageDecodeError(f"{source}: empty image data")
    if len(data) > limits.max_bytes:
        raise ImageDecodeError(f"{source}: {len(data)} bytes exceeds the limit of {limits.max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(limits.formats))
            width, height = image.size
            if width * height > limits.max_pixels or max(width, height) > limits.max_side:
                raise ImageDecodeError(
                    f"{source}: {width}x{height} pixels exceeds the limit of {limits.max_pixels} pixels / {limits.max_side} per side"
                )
            if width < 1 or height < 1:
                raise ImageDecodeError(f"{source}: image has no pixels ({width}x{height})")
            image.load()
    except ImageDecodeError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        allowed = "/".join(limits.formats)
        raise ImageDecodeError(f"{source}: not a decodable image of the allowed formats {allowed} ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"{source}: corrupt or truncated image ({exc})") from None
    return image.convert("RGB")


def read_image_file(path: str | Path, limits: ImageLimits = ImageLimits()) -> Image.Image:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageDecodeError(f"{path}: image file does not exist") from None
    except OSError as exc:
        raise ImageDecodeError(f"{path}: cannot read image file ({exc.strerror})") from None
    return decode_image(data, source=str(path), limits=limits)


def to_pixels(image: Image.Image, spec: PixelSpec = PixelSpec()) -> np.ndarray:
    """RGB image -> normalised float32 [3, size, size]."""
    resized = image.resize((spec.size, spec.size), Image.Resampling.BILINEAR)
    array = np.asarray(resized, dtype=np.float32) / 255.0
    array = (array - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def grid_boxes(grid: int) -> np.ndarray:
    """Normalised (x1, y1, x2, y2) boxes of a grid x grid layout, row-major, float32 [grid*grid, 4]."""
    edges = np.linspace(0.0, 1.0, grid + 1, dtype=np.float32)
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    return np.stack([edges[cols], edges[rows], edges[cols + 1], edges[rows + 1]], axis=1)
