"""The torch-free table of peft's parameter names, against peft's own tuner layer classes.

The registry derives a generic adapter's modules from its tensor names with
`PARAMETER_NAMES`; when peft adds a type or renames a parameter this test fails
until the table says what peft says.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest
from peft import get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTunerLayer

from peftreg.adapters.generic_modules import PARAMETER_NAMES, adapted_modules, module_of
from peftreg.adapters.peft_import import read_peft_directory
from peftreg.adapters.schema import GENERIC_KINDS
from tests.adapters.tiny_models import tiny_llama


def _peft_parameter_names(peft_type: str) -> frozenset[str]:
    """adapter_layer_names and other_param_names of every tuner layer class of the type."""
    tuner = PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type)
    if tuner is None:
        return frozenset()
    package = tuner.__module__.rsplit(".", 1)[0]
    found: set[str] = set()
    for info in pkgutil.walk_packages(importlib.import_module(package).__path__, package + "."):
        try:
            module = importlib.import_module(info.name)
        except ImportError:  # the bitsandbytes / other-backend layers of the type
            continue
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseTunerLayer) and cls.__module__.startswith(package + "."):
                found |= set(cls.adapter_layer_names) | set(cls.other_param_names)
    return frozenset(found)


def test_the_table_has_a_row_for_every_generic_kind() -> None:
    assert sorted(PARAMETER_NAMES) == sorted(GENERIC_KINDS)


@pytest.mark.parametrize("kind", sorted(GENERIC_KINDS))
def test_the_table_names_the_parameters_peft_defines(kind: str) -> None:
    assert PARAMETER_NAMES[kind] == _peft_parameter_names(kind.upper())


def test_a_module_is_the_path_before_the_last_parameter_segment() -> None:
    assert module_of("glora", "base_model.model.model.l.0.q.glora_A.Xd") == "model.l.0.q"
    assert module_of("shadow", "base_model.model.model.l.0.shadow_up.default.weight") == (
        "model.l.0"
    )
    assert module_of("vera", "base_model.vera_A") is None  # shared by the tuner
    assert module_of("ia3", "base_model.model.lm_head.weight") is None  # modules_to_save


def test_ranks_come_from_the_config_and_its_patterns() -> None:
    names = [f"base_model.model.layers.{i}.q.fourierft_spectrum" for i in (0, 1)]
    config = {"n_frequency": 16, "n_frequency_pattern": {"layers.1.q": 8}}
    assert [(m["module"], m["rank"]) for m in adapted_modules("fourierft", config, names)] == [
        ("layers.0.q", 16),
        ("layers.1.q", 8),
    ]
    assert [m["rank"] for m in adapted_modules("ia3", {"r": 4}, ["base_model.model.q.ia3_l"])] == [
        None
    ]


def test_the_largest_module_rank_is_the_adapters_rank(tmp_path: Path) -> None:
    """LoHa with a rank_pattern above r: each module's rank, and the largest one."""
    config = PEFT_TYPE_TO_CONFIG_MAPPING["LOHA"](
        task_type="CAUSAL_LM", r=4, rank_pattern={"v_proj": 8}, target_modules=["q_proj", "v_proj"]
    )
    get_peft_model(tiny_llama(), config).save_pretrained(str(tmp_path))
    imported = read_peft_directory(tmp_path).config
    assert {m.module.rsplit(".", 1)[-1]: m.rank for m in imported.modules} == {
        "q_proj": 4,
        "v_proj": 8,
    }
    assert imported.rank == 8
