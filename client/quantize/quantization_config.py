"""The config.json `quantization_config` of a compressed-tensors W4A16 `pack-quantized` model.

The fields are the ones compressed-tensors' `QuantizationConfig` /
`QuantizationArgs` pydantic models accept (checked against them in the
tests), limited to long-standing fields so older readers (vLLM's pinned
compressed-tensors) accept it too. `observer` records how scales were chosen:
`minmax` for round-to-nearest, `mse` for the clipping search; it does not
change how the weights load.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from peftreg.quantize.int4 import Int4Algorithm

PACK_QUANTIZED = "pack-quantized"
OBSERVER_BY_ALGORITHM: dict[str, str] = {"rtn": "minmax", "mse": "mse"}


def w4a16_quantization_config(
    *, group_size: int, algorithm: Int4Algorithm, ignore: Sequence[str]
) -> dict[str, Any]:
    """Symmetric int4 weights in groups of `group_size`, every Linear but the `ignore`d ones."""
    return {
        "quant_method": "compressed-tensors",
        "format": PACK_QUANTIZED,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": 4,
                    "type": "int",
                    "symmetric": True,
                    "strategy": "group",
                    "group_size": group_size,
                    "dynamic": False,
                    "actorder": None,
                    "block_structure": None,
                    "observer": OBSERVER_BY_ALGORITHM[algorithm],
                    "observer_kwargs": {},
                },
                "input_activations": None,
                "output_activations": None,
                "format": PACK_QUANTIZED,
            }
        },
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }
