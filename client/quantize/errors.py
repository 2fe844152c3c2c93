"""Typed errors of INT4 quantization: settings or tensors the encoder cannot honour."""

from __future__ import annotations

from peftreg.sdk.errors import InvalidRequest


class QuantizationError(InvalidRequest):
    """A tensor or a setting that INT4 quantization refuses."""


class InvalidGroupSize(QuantizationError):
    """A group size that is not a positive multiple of 8, or does not divide the input dim."""


class UnknownAlgorithm(QuantizationError):
    """A quantization algorithm id other than the ones this package implements."""


class UnquantizableTensor(QuantizationError):
    """A tensor that cannot be quantized: not 2-D, not floating point, or not finite."""
