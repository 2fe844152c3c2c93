"""INT4 (W4A16) weight quantization written in the compressed-tensors `pack-quantized` format."""

from peftreg.quantize.encoder import Int4Encoder
from peftreg.quantize.errors import (
    InvalidGroupSize,
    QuantizationError,
    UnknownAlgorithm,
    UnquantizableTensor,
)
from peftreg.quantize.int4 import (
    Int4Algorithm,
    ReconstructionError,
    dequantize,
    quantize_groups,
    reconstruction_error,
)
from peftreg.quantize.linear_layers import linear_weight_names
from peftreg.quantize.pack import pack_int4, unpack_int4

__all__ = [
    "Int4Algorithm",
    "Int4Encoder",
    "InvalidGroupSize",
    "QuantizationError",
    "ReconstructionError",
    "UnknownAlgorithm",
    "UnquantizableTensor",
    "dequantize",
    "linear_weight_names",
    "pack_int4",
    "quantize_groups",
    "reconstruction_error",
    "unpack_int4",
]
