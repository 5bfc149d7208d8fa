"""export.exporter drops torch.onnx's "torchvision is not installed. Skipping torchvision::..." warnings, and only those."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.export import Dim

from export.exporter import TORCH_ONNX_REGISTRY_LOGGER, export_onnx, quiet_torchvision_skip
from export.sources import GraphModule


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_filter_drops_exactly_the_torchvision_skip_message():
    logger = logging.getLogger(TORCH_ONNX_REGISTRY_LOGGER)
    records = _Records()
    logger.addHandler(records)
    try:
        with quiet_torchvision_skip():
            logger.warning("torchvision is not installed. Skipping %s", "torchvision::nms")
            logger.warning("'%s' does not have a 'default' overload. This could be an error in specifying the op name. Ignoring.", "x::y")
        logger.warning("torchvision is not installed. Skipping %s", "torchvision::roi_align")  # filter removed on exit
    finally:
        logger.removeHandler(records)
    assert records.messages == [
        "'x::y' does not have a 'default' overload. This could be an error in specifying the op name. Ignoring.",
        "torchvision is not installed. Skipping torchvision::roi_align",
    ]
    assert logger.filters == []


class _Normalize(torch.nn.Module):
    def forward(self, x):
        return (torch.nn.functional.normalize(x, dim=-1),)


@pytest.mark.slow  # one small torch.onnx.export (a few seconds)
def test_export_onnx_prints_no_torchvision_warnings(tmp_path, capfd):
    graph = GraphModule("normalize", _Normalize(), ["x"], ["y"], (torch.randn(2, 4),), ({0: Dim("batch", min=1, max=64)},), [])
    export_onnx(graph, tmp_path / "normalize.onnx")
    assert (tmp_path / "normalize.onnx").stat().st_size > 0
    captured = capfd.readouterr()
    assert "torchvision" not in captured.err + captured.out
