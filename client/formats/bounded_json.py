"""JSON from untrusted bytes, with its nesting depth bounded.

`json.loads` recurses once per level, so a document of a thousand nested
brackets raises `RecursionError`, and one just under the interpreter's limit
parses but breaks whatever walks it later (validation, serialization). Real
manifests, cursors and safetensors headers nest a handful of levels.
"""

from __future__ import annotations

import json
from typing import Any

MAX_JSON_DEPTH = 64


class JsonTooDeep(ValueError):
    """A JSON document nested deeper than the bound."""


def nesting_depth(document: Any, *, limit: int) -> int:
    """The document's depth (a scalar is 0, `[]` is 1), counted up to `limit + 1`."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(document, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children: Any = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        depth += 1
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        # only containers go on the stack: a scalar child adds no depth
        stack.extend((child, depth) for child in children if isinstance(child, dict | list))
    return deepest


def loads_bounded(data: str | bytes, *, max_depth: int = MAX_JSON_DEPTH, **options: Any) -> Any:
    """`json.loads`, raising `JsonTooDeep` for documents nested deeper than `max_depth`."""
    try:
        document = json.loads(data, **options)
    except RecursionError:
        raise JsonTooDeep(f"JSON nests deeper than {max_depth} levels") from None
    if nesting_depth(document, limit=max_depth) > max_depth:
        raise JsonTooDeep(f"JSON nests deeper than {max_depth} levels")
    return document
