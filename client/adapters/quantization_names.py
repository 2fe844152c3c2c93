"""The names of base quantizations, without pydantic: the CLI's choices at start-up.

`peftreg.adapters.schema.BaseQuantization` is the typed form; a unit test
keeps the two equal.
"""

from __future__ import annotations

BASE_QUANTIZATIONS: tuple[str, ...] = ("none", "nf4", "fp4", "int8", "int4")
