"""Merging adapters into their base: a streaming library used by merge jobs and `peftreg merge`.

The names below load on first use, so importing `peftreg.merge.errors` (as the
CLI does) never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "check_compatible": "peftreg.merge.compat",
    "IncompatibleBase": "peftreg.merge.errors",
    "MergeCancelled": "peftreg.merge.errors",
    "MergeError": "peftreg.merge.errors",
    "AdapterInput": "peftreg.merge.inputs",
    "adapter_from_peft_directory": "peftreg.merge.inputs",
    "adapter_from_snapshot": "peftreg.merge.inputs",
    "MergeResult": "peftreg.merge.stream",
    "merge_to_directory": "peftreg.merge.stream",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
