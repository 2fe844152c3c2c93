"""The tensors peft saves for an adapter config on a base architecture, from peft itself.

Rather than one shape rule per adapter type, the base model is built from its
config.json on the meta device (no memory, no weights), the adapter's
`adapter_config.json` is injected with peft, and `get_peft_model_state_dict`
names every tensor peft would save, with its shape. An adapter's safetensors
header must hold exactly those names and shapes. Needs torch, transformers and
peft; the registry, which has none of them, checks names, dtypes and values
only (`peftreg.adapters.validate`).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Mapping
from typing import Any

from peftreg.adapters.peft_import import ImportedAdapter, PeftImportError


def build_peft_model(
    peft_config: Mapping[str, Any], model_config: Mapping[str, Any], *, device: str = "meta"
) -> Any:
    """peft's model for `peft_config` on the architecture of `model_config` (a config.json
    document), built on `device`: "meta" (no memory), or "cpu", where the base's
    parameters are zeros (committed only where written)."""
    import torch
    from peft import PeftConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    document = dict(model_config)
    model_type = document.pop("model_type", None)
    if not isinstance(model_type, str):
        raise PeftImportError("the base's config.json has no model_type")
    architecture = AutoConfig.for_model(model_type, **document)
    adapter = {key: value for key, value in peft_config.items() if key != "peft_version"}
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(architecture)  # type: ignore[no-untyped-call]
        if device != "meta":
            model = model.to_empty(device=device)
            with torch.no_grad():
                for tensor in [*model.parameters(), *model.buffers()]:
                    tensor.zero_()
        with torch.device(device):
            peft_config_object = PeftConfig.from_peft_type(**adapter)  # type: ignore[no-untyped-call]
            return get_peft_model(model, peft_config_object)


def expected_tensors(
    peft_config: Mapping[str, Any], model_config: Mapping[str, Any]
) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor peft saves for `peft_config` on the architecture of
    `model_config` (a config.json document)."""
    from peft import get_peft_model_state_dict

    try:
        peft_model = build_peft_model(peft_config, model_config)
    except (NotImplementedError, RuntimeError):
        # Types whose initialisation computes on the base weights (BOFT, SHiRA, FRoD,
        # UniLoRA, ...) need real storage.
        peft_model = build_peft_model(peft_config, model_config, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = get_peft_model_state_dict(peft_model)
    return {name: tuple(int(n) for n in value.shape) for name, value in state.items()}


def check_against_architecture(
    imported: ImportedAdapter, model_config: Mapping[str, Any], base: str
) -> None:
    """Raise PeftImportError, naming the tensor, when the adapter's tensors are not what
    peft saves for its config on `base`'s architecture."""
    try:
        expected = expected_tensors(imported.config.peft_config, model_config)
    except PeftImportError:
        raise
    except Exception as exc:  # peft or transformers refusing the config on this architecture
        raise PeftImportError(
            f"peft cannot apply this {imported.config.kind} adapter_config.json to the "
            f"architecture of {base}: {type(exc).__name__}: {exc}"
        ) from None
    got = {spec.name: tuple(spec.shape) for spec in imported.config.tensors}
    for name in sorted(set(got) | set(expected)):
        if name not in expected:
            raise PeftImportError(
                f"tensor {name!r} is not one peft saves for this {imported.config.kind} "
                f"config on the architecture of {base}"
            )
        if name not in got:
            raise PeftImportError(
                f"tensor {name!r}, which peft saves for this {imported.config.kind} config on "
                f"the architecture of {base}, is missing"
            )
        if got[name] != expected[name]:
            raise PeftImportError(
                f"tensor {name!r} has shape {list(got[name])}, but peft makes "
                f"{list(expected[name])} for this {imported.config.kind} config on the "
                f"architecture of {base}"
            )


__all__ = ["build_peft_model", "check_against_architecture", "expected_tensors"]
