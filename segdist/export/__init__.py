"""What leaves segdist with a trained model: an ONNX file proven equal to PyTorch (``segdist export``).

* :mod:`.options` -- the opsets and defaults the command offers (no torch: the CLI reads them);
* :mod:`.onnx` -- :func:`export_onnx`: the graph with normalisation folded in, checked against PyTorch
  on real images before the file appears (see its docstring).

The names of :mod:`.onnx` load on first use (it loads torch, OpenCV and the model code).
"""

from __future__ import annotations

from ..lazy import attach
from .options import DEFAULT_COUNT, DEFAULT_OPSET, OPSETS

_LAZY = {
    "onnx": ("EXTRA", "MAX_ABS", "MIN_AGREEMENT", "Parity", "Uint8Model", "check_batches", "check_inputs", "compare",
             "export_onnx", "folder_inputs", "missing_extra_message", "onnx_bytes", "require_onnx", "resized",
             "shard_inputs", "synthetic_inputs"),
}

__all__ = ["DEFAULT_COUNT", "DEFAULT_OPSET", "OPSETS", *(name for names in _LAZY.values() for name in names)]

__getattr__, __dir__ = attach(__name__, _LAZY)
