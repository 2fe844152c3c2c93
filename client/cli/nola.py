"""`peftreg nola import`: NOLA reference-code checkpoints to a pushable directory."""

from __future__ import annotations

from pathlib import Path

import click

from peftreg.cli.common import emit, json_option


@click.group()
def nola() -> None:
    """NOLA adapters (seeds and coefficients of random bases)."""


@nola.command("import")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("output", type=click.Path(file_okay=False, path_type=Path))
@click.option("--alpha", "lora_alpha", type=float, required=True, help="LoRA alpha of training.")
@click.option("--base-name", help="base_model_name_or_path to record.")
@click.option("--fan-in-fan-out", is_flag=True, help="Targets are GPT-2 style Conv1D layers.")
@json_option
def import_checkpoint(
    checkpoint: Path,
    output: Path,
    lora_alpha: float,
    base_name: str | None,
    fan_in_fan_out: bool,
    as_json: bool,
) -> None:
    """Convert a NOLA reference checkpoint (safetensors) into OUTPUT, ready to push.

    Bases are regenerated with the pinned CPU generator and the factors'
    digest is recorded, so any later reconstruction that differs is refused.
    """
    from peftreg.adapters.nola import compression_ratio, import_reference_checkpoint

    config, written = import_reference_checkpoint(
        checkpoint,
        output,
        lora_alpha=lora_alpha,
        base_model_name_or_path=base_name,
        fan_in_fan_out=fan_in_fan_out,
    )
    assert config.nola is not None
    payload = {
        "output": str(written),
        "modules": len(config.targets),
        "stored_parameters": config.nola.stored_parameters,
        "materialized_parameters": config.nola.materialized_parameters,
        "compression": compression_ratio(config),
    }
    emit(
        as_json,
        payload,
        f"{written}: {len(config.targets)} modules, {config.nola.stored_parameters} stored "
        f"parameters for {config.nola.materialized_parameters} materialized "
        f"(compression {compression_ratio(config):.1f}x against the equivalent LoRA)",
    )
