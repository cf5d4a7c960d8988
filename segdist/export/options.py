"""The choices ``segdist export`` offers, apart from the exporter, so the CLI can show them without loading
torch (``segdist --help`` and a config typo stay fast)."""

from __future__ import annotations

DEFAULT_OPSET = 17
OPSETS = range(11, 21)
"""Opsets the TorchScript exporter writes for these models (Resize needs 11; 20 is its maximum)."""
DEFAULT_COUNT = 8
