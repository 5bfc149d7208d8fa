"""numpy <-> `teran.v1.Tensor` (raw little-endian bytes), with validation that names the field."""

from __future__ import annotations

from typing import cast

import numpy as np

from teran.errors import FeatureShapeError
from teran_api._proto import common_pb2

Tensor = common_pb2.Tensor
FLOAT32 = Tensor.FLOAT32
FLOAT16 = Tensor.FLOAT16
NUMPY_DTYPES: dict[int, np.dtype] = {FLOAT32: np.dtype("<f4"), FLOAT16: np.dtype("<f2")}
NAMES: dict[int, str] = {FLOAT32: "FLOAT32", FLOAT16: "FLOAT16"}
_BY_NAME = {"float32": FLOAT32, "fp32": FLOAT32, "float16": FLOAT16, "fp16": FLOAT16}


def dtype_code(dtype) -> common_pb2.Tensor.DType:
    """'float32' / 'fp16' / np.float16 / a Tensor.DType value -> Tensor.DType (UNSPECIFIED -> FLOAT32)."""
    if isinstance(dtype, int) and not isinstance(dtype, bool):
        if dtype == Tensor.DTYPE_UNSPECIFIED:
            return FLOAT32
        if dtype in NUMPY_DTYPES:
            return cast("common_pb2.Tensor.DType", dtype)
        raise ValueError(f"unsupported tensor dtype code {dtype}")
    if isinstance(dtype, str) and dtype.lower() in _BY_NAME:
        return _BY_NAME[dtype.lower()]
    try:
        np_dtype = np.dtype(dtype)
    except TypeError:
        np_dtype = None
    if np_dtype == np.float32:
        return FLOAT32
    if np_dtype == np.float16:
        return FLOAT16
    raise ValueError(f"unsupported tensor dtype {dtype!r}; use float32 or float16")


def to_tensor(array: np.ndarray, dtype=FLOAT32) -> common_pb2.Tensor:
    return fill_tensor(Tensor(), array, dtype_code(dtype))


def fill_tensor(tensor: common_pb2.Tensor, array: np.ndarray, code: int) -> common_pb2.Tensor:
    """Write `array` into `tensor` (e.g. a response's sub-message, in place: no CopyFrom) as dtype `code` (a Tensor.DType)."""
    data = np.ascontiguousarray(array, dtype=NUMPY_DTYPES[code])
    tensor.dtype = cast("common_pb2.Tensor.DType", code)
    tensor.shape[:] = data.shape
    tensor.data = data.tobytes()
    return tensor


def from_tensor(
    tensor: common_pb2.Tensor,
    field: str = "tensor",
    *,
    ndim: int | None = None,
    finite: bool = True,
    max_elements: int | None = None,
) -> np.ndarray:
    """Decode to a float32 array; FeatureShapeError names `field` and what is wrong. DTYPE_UNSPECIFIED
    means FLOAT32, as common.proto documents for requests."""
    code = FLOAT32 if tensor.dtype == Tensor.DTYPE_UNSPECIFIED else tensor.dtype
    if code not in NUMPY_DTYPES:
        raise FeatureShapeError(f"{field}.dtype: {tensor.dtype} is not supported; use FLOAT32 or FLOAT16 (DTYPE_UNSPECIFIED: FLOAT32)")
    shape = tuple(int(d) for d in tensor.shape)
    if ndim is not None and len(shape) != ndim:
        raise FeatureShapeError(f"{field}.shape: expected {ndim} dimensions, got {list(shape)}")
    if any(d < 0 for d in shape):
        raise FeatureShapeError(f"{field}.shape: negative dimension in {list(shape)}")
    count = 1
    for d in shape:
        count *= d
        if max_elements is not None and count > max_elements:
            raise FeatureShapeError(f"{field}.shape: {list(shape)} exceeds the limit of {max_elements} elements")
    dtype = NUMPY_DTYPES[code]
    expected = count * dtype.itemsize
    if len(tensor.data) != expected:
        raise FeatureShapeError(f"{field}.data: {len(tensor.data)} bytes, but shape {list(shape)} of {NAMES[code]} needs {expected} bytes")
    array = np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
    array = array.astype(np.float32)
    if finite and array.size and not np.isfinite(array).all():
        bad = int(np.flatnonzero(~np.isfinite(array.ravel()))[0])
        raise FeatureShapeError(f"{field}: non-finite value (NaN or infinity) at flat index {bad}")
    return array


def decode(tensor: common_pb2.Tensor) -> np.ndarray:
    """Client side: a response tensor in its own dtype (float32 or float16), without copying."""
    dtype = NUMPY_DTYPES.get(tensor.dtype)
    if dtype is None:
        raise ValueError(f"unsupported tensor dtype code {tensor.dtype}")
    return np.frombuffer(tensor.data, dtype=dtype).reshape(tuple(tensor.shape))
