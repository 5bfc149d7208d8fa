"""Hypothesis strategies shared by the fuzz suites of both services (tests/test_*_fuzz.py)."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from teran_api._proto import common_pb2


@st.composite
def tensors(draw, columns: int, rows: int | None, unit: bool = False):
    """A Tensor: usually the right layout ([rows, columns], or [columns] when rows is None; matching bytes;
    boxes x1<=x2; unit rows when `unit`), sometimes anything (other dtypes, shapes, byte counts, scales,
    NaN / inf)."""
    right = [columns] if rows is None else [rows, columns]
    dtype = draw(st.sampled_from([1] * 6 + [2] * 3 + [0, 9]))
    shape = draw(st.sampled_from([right] * 9 + [draw(st.lists(st.integers(-2, 70), max_size=3))]))
    if draw(st.integers(0, 19)) == 0:
        data = draw(st.binary(max_size=400))
    else:
        count = int(np.prod([max(d, 0) for d in shape])) if shape else 1
        rng = np.random.default_rng(draw(st.integers(0, 2**16)))
        values = rng.random(count) * draw(st.sampled_from([1.0, 1.0, 0.5, 1000.0]))
        if unit and shape == right and count:
            matrix = rng.standard_normal((count // columns, columns))
            values = (matrix / np.linalg.norm(matrix, axis=1, keepdims=True) * draw(st.sampled_from([1.0] * 9 + [100.0]))).ravel()
        if columns == 4 and shape == [rows, 4]:
            pairs = values.reshape(rows, 2, 2)
            values = np.concatenate([pairs.min(axis=1), pairs.max(axis=1)], axis=1).ravel()
        if count and draw(st.integers(0, 9)) == 0:
            values[rng.integers(count)] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        data = values.astype("<f2" if dtype == 2 else "<f4").tobytes()
    return common_pb2.Tensor(dtype=dtype, shape=shape, data=data)
