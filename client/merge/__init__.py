"""Merging adapters into their base: a streaming library used by merge jobs and `peftreg merge`.

The names below load on first use, so importing `client.merge.errors` (as the
CLI does) never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "check_compatible": "client.merge.compat",
    "IncompatibleBase": "client.merge.errors",
    "MergeCancelled": "client.merge.errors",
    "MergeError": "client.merge.errors",
    "AdapterInput": "client.merge.inputs",
    "adapter_from_peft_directory": "client.merge.inputs",
    "adapter_from_snapshot": "client.merge.inputs",
    "MergeResult": "client.merge.stream",
    "merge_to_directory": "client.merge.stream",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
