"""MoRA (peft-mora's `use_mora`): typed import, base validation, exact merge, pull round trip.

Adapters are written here in the layout the peft-mora fork (github.com/kongds/MoRA)
saves: a LORA `adapter_config.json` with `use_mora` and `mora_type`, and one square
matrix per Linear saved as both `lora_A.weight` and `lora_B.weight`. The reference
below transcribes the fork's `_apply_mora` (forward) and `get_delta_weight` (merge) of
`peft/tuners/lora/layer.py` for types 1 and 6, independently of peftreg's operator.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from torch import nn

from peftreg import Client
from peftreg.adapters.base_package import push_base
from peftreg.adapters.factors import FactorError, adapter_factors
from peftreg.adapters.mora import mora_rank
from peftreg.adapters.peft_import import PeftImportError, read_peft_directory
from peftreg.adapters.schema import ADAPTER_CONFIG_MEDIA_TYPE
from peftreg.adapters.validate import AdapterInvalid, validate_adapter
from peftreg.cli.main import cli as cli_main
from peftreg.hotswap import AdapterHost, HostConfig, UnsupportedAdapter
from peftreg.merge import adapter_from_peft_directory, merge_to_directory
from peftreg.merge.mora import mora_delta
from tests.adapters.documents import assert_document_is_the_model
from tests.adapters.tiny_models import LLAMA_NAME, same_weights, sample_ids, tiny_llama
from tests.fixtures.cli import CliEnv
from tests.fixtures.schemas import assert_valid_config
from tests.fixtures.server import RegistryProcess
from tests.merge.builders import directory_tensors, save_base

TOLERANCE = 1e-6
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]  # (in, out): 32-32, 32-16, 32-64, 64-32
PREFIX = "base_model.model."


# --- the fork's math, transcribed ------------------------------------------------------


def _fork_rope(r: int, rb1: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, r, 2).float() / r))
    t = torch.arange(rb1)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().unsqueeze(0).to(like.dtype), emb.sin().unsqueeze(0).to(like.dtype)


def fork_apply_mora(
    x: torch.Tensor, weight: torch.Tensor, in_f: int, out_f: int, mora_type: int
) -> torch.Tensor:
    """peft-mora's LoraLayer._apply_mora for types 1 and 6 (lora_A(v) = v @ weight.T)."""
    r = weight.shape[0]
    if mora_type == 1:
        sum_inter = in_f // r
        if in_f % r != 0:
            pad_size = r - in_f % r
            x = torch.cat([x, x[..., :pad_size]], dim=-1)
            sum_inter += 1
        in_x = x.view(*x.shape[:-1], sum_inter, r).sum(dim=-2)
    else:
        sum_inter = in_f // r
        rb1 = in_f // r if in_f % r == 0 else in_f // r + 1
        if in_f % r != 0:
            pad_size = r - in_f % r
            x = torch.cat([x, x[..., :pad_size]], dim=-1)
            sum_inter += 1
        in_x = x.view(*x.shape[:-1], sum_inter, r)
        cos, sin = _fork_rope(r, rb1, x)
        rh_in_x = torch.cat((-in_x[..., r // 2 :], in_x[..., : r // 2]), dim=-1)
        in_x = in_x * cos + rh_in_x * sin
    out_x = in_x @ weight.T
    if mora_type == 1:
        repeat_time = out_f // r
        if out_f % r != 0:
            repeat_time += 1
        out_x = torch.cat([out_x] * repeat_time, dim=-1)[..., :out_f]
    else:
        out_x = out_x.view(*x.shape[:-1], -1)[..., :out_f]
        if out_x.shape[-1] < out_f:
            repeat_time = out_f // out_x.shape[-1]
            if out_f % out_x.shape[-1] != 0:
                repeat_time += 1
            out_x = torch.cat([out_x] * repeat_time, dim=-1)[..., :out_f]
    return out_x


def fork_delta_weight(weight: torch.Tensor, in_f: int, out_f: int, mora_type: int) -> torch.Tensor:
    """peft-mora's Linear.get_delta_weight with use_mora, types 1 and 6."""
    r = weight.shape[0]
    pad_size = r - in_f % r if in_f % r != 0 else 0
    repeat_time = out_f // r + (1 if out_f % r != 0 else 0)
    aw = weight
    if mora_type == 1:
        w = torch.zeros(r, in_f)
        for i in range(in_f + pad_size):
            w[:, i % in_f] += aw[:, i % r]
        return torch.cat([w] * repeat_time, dim=0)[:out_f]
    w = torch.zeros(in_f + pad_size, in_f)
    rb1 = in_f // r if in_f % r == 0 else in_f // r + 1
    rb2 = out_f // r if out_f % r == 0 else out_f // r + 1
    cos, sin = _fork_rope(r, rb1, w)
    aw2 = torch.cat((aw[:, r // 2 :], -aw[:, : r // 2]), dim=-1)
    i = 0
    for i in range(rb1 - 1):
        w[i * r : (i + 1) * r, i * r : (i + 1) * r] = aw2 * sin[:, i] + aw * cos[:, i]
    i += 1
    w[i * r :, i * r :] = (aw2 * sin[:, i] + aw * cos[:, i])[:, : r - pad_size]
    if pad_size > 0:
        w[i * r :, :pad_size] = (aw2 * sin[:, i] + aw * cos[:, i])[:, r - pad_size :]
    if in_f < out_f:
        return torch.cat([w] * rb2, dim=0)[:out_f]
    return w[:out_f]


# --- adapters in peft-mora's layout ------------------------------------------------------


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS
    }


def save_mora(
    directory: Path,
    *,
    r: int,
    mora_type: int,
    seed: int = 3,
    side_rank: int | None = None,
    config_extra: dict[str, object] | None = None,
) -> Path:
    """A peft-mora adapter for the tiny Llama: squares sized from `side_rank` (default r)."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, linear in _linears(tiny_llama()).items():
        side = mora_rank(linear.in_features, linear.out_features, side_rank or r, mora_type)
        square = torch.randn(side, side, generator=generator) * 0.05
        tensors[f"{PREFIX}{name}.lora_A.weight"] = square
        tensors[f"{PREFIX}{name}.lora_B.weight"] = square.clone()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": LLAMA_NAME,
        "r": r,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "target_modules": TARGETS,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "use_mora": True,
        "mora_type": mora_type,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        **(config_extra or {}),
    }
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    return directory


def reference_model(directory: Path) -> nn.Module:
    """The tiny Llama running the fork's forward: base(x) + _apply_mora(x) per target."""
    config = json.loads((directory / "adapter_config.json").read_text())
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    model = same_weights(tiny_llama())
    for name, linear in _linears(model).items():
        square = tensors[f"{PREFIX}{name}.lora_A.weight"]

        def hook(
            module: nn.Linear,
            inputs: tuple[torch.Tensor, ...],
            output: torch.Tensor,
            square: torch.Tensor = square,
        ) -> torch.Tensor:
            delta = fork_apply_mora(
                inputs[0], square, module.in_features, module.out_features, config["mora_type"]
            )
            return output + delta

        linear.register_forward_hook(hook)
    return model


# --- the operator --------------------------------------------------------------------------


@pytest.mark.parametrize("mora_type", [1, 6], ids=["type1", "type6"])
@pytest.mark.parametrize(
    ("in_f", "out_f", "r"),
    [(32, 32, 4), (32, 16, 4), (32, 64, 2), (64, 32, 4), (30, 70, 8), (50, 20, 1)],
    ids=["square", "narrow-out", "wide-out", "wide-in", "padded", "padded-narrow"],
)
def test_delta_matches_the_fork_forward_and_merge(
    mora_type: int, in_f: int, out_f: int, r: int
) -> None:
    side = mora_rank(in_f, out_f, r, mora_type)
    assert side == int(math.sqrt((in_f + out_f) * r) + 0.5) // 2 * 2 if mora_type == 6 else True
    square = torch.randn(side, side, generator=torch.Generator().manual_seed(side))
    delta = mora_delta(square, in_f, out_f, mora_type)
    assert delta.shape == (out_f, in_f)
    assert (delta - fork_delta_weight(square, in_f, out_f, mora_type)).abs().max() <= TOLERANCE
    x = torch.randn(3, 5, in_f, generator=torch.Generator().manual_seed(1))
    want = fork_apply_mora(x, square, in_f, out_f, mora_type)
    assert want.abs().max() > 0.1
    assert (x @ delta.T - want).abs().max() <= 1e-5 * max(1.0, float(want.abs().max()))


# --- import and validation ----------------------------------------------------------------


def test_import_is_typed_mora_never_plain_lora(tmp_path: Path) -> None:
    directory = save_mora(tmp_path / "mora", r=4, mora_type=6)
    imported = read_peft_directory(directory)
    assert_document_is_the_model(imported)
    config = imported.config
    assert config.kind == "mora"
    assert config.mora is not None
    assert (config.mora.mora_type, config.mora.r) == (6, 4)
    sides = {t.module.rsplit(".", 1)[-1]: t.rank for t in config.targets}
    assert sides == {"q_proj": 16, "v_proj": 14, "up_proj": 20, "down_proj": 20}
    assert config.mora.r_hat == config.rank == 20
    assert all(t.scaling == 1.0 and t.layer == "linear" for t in config.targets)
    assert_valid_config(config.model_dump(mode="json"), ADAPTER_CONFIG_MEDIA_TYPE)

    # The same tensors and config claimed as plain LoRA are refused, wherever validated.
    as_lora = config.model_copy(update={"kind": "lora", "mora": None})
    header_path = directory / "adapter_model.safetensors"
    from peftreg.adapters.peft_import import read_safetensors_header

    header = read_safetensors_header(header_path)
    with pytest.raises(AdapterInvalid, match="use_mora"):
        validate_adapter(as_lora, header, lambda name: iter(()), None)
    with pytest.raises(FactorError, match="sets use_mora"):
        adapter_factors(as_lora, load_file(str(header_path)))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mora_type": 2}, "mora_type 2 is not supported"),
        ({"use_dora": True}, "use_dora is set"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out is set"),
        ({"bias": "all"}, "bias='all'"),
    ],
    ids=["type2", "dora", "conv1d", "bias"],
)
def test_unsupported_mora_configs_are_refused(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    directory = save_mora(tmp_path / "mora", r=4, mora_type=1, config_extra=change)
    with pytest.raises(PeftImportError, match=message):
        read_peft_directory(directory)


def test_different_lora_a_and_lora_b_are_refused(tmp_path: Path) -> None:
    directory = save_mora(tmp_path / "mora", r=4, mora_type=1)
    path = directory / "adapter_model.safetensors"
    tensors = load_file(str(path))
    name = f"{PREFIX}model.layers.1.mlp.up_proj.lora_B.weight"
    tensors[name][0, 0] += 1.0
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(PeftImportError, match=r"up_proj: lora_A\.weight and lora_B\.weight differ"):
        read_peft_directory(directory)


# --- merge ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mora_type", [1, 6], ids=["type1", "type6"])
def test_merge_is_exact_against_the_fork(tmp_path: Path, mora_type: int) -> None:
    base_dir = save_base(tiny_llama(), tmp_path / "base")
    directory = save_mora(tmp_path / "mora", r=4, mora_type=mora_type)
    out = tmp_path / "merged"
    merge_to_directory(base_dir, [adapter_from_peft_directory(directory)], out, device="cpu")
    merged = directory_tensors(out)
    base = directory_tensors(base_dir)
    squares = load_file(str(directory / "adapter_model.safetensors"))
    changed = 0
    for name, value in base.items():
        module = name[: -len(".weight")]
        square = squares.get(f"{PREFIX}{module}.lora_A.weight")
        if square is None:
            assert torch.equal(merged[name], value), name
            continue
        out_f, in_f = value.shape
        want = value + fork_delta_weight(square, in_f, out_f, mora_type)
        assert (merged[name] - want).abs().max() <= TOLERANCE, name
        changed += 1
    assert changed == 2 * len(TARGETS)

    # The merged model computes what the fork's unmerged forward computes.
    model = same_weights(tiny_llama())
    model.load_state_dict(merged, strict=False)
    ids = sample_ids()
    with torch.no_grad():
        want_logits = reference_model(directory)(input_ids=ids).logits
        got = model(input_ids=ids).logits
        plain = tiny_llama()(input_ids=ids).logits
    assert (want_logits - plain).abs().max() > 1e-3
    assert (got - want_logits).abs().max() <= 1e-5

    # `peftreg merge` runs the same library: the same tensors.
    command = tmp_path / "command"
    result = CliRunner().invoke(
        cli_main,
        ["merge", str(directory), "--base", str(base_dir), "-o", str(command), "-q"],
        env={"PEFTREG_URL": "http://127.0.0.1:9"},
    )
    assert result.exit_code == 0, result.output
    assert all(
        torch.equal(value, merged[name]) for name, value in directory_tensors(command).items()
    )


def test_weighted_sum_of_two_mora_adapters_is_exact(tmp_path: Path) -> None:
    base_dir = save_base(tiny_llama(), tmp_path / "base")
    first = save_mora(tmp_path / "type1", r=4, mora_type=1, seed=1)
    second = save_mora(tmp_path / "type6", r=2, mora_type=6, seed=2)
    out = tmp_path / "merged"
    inputs = [
        adapter_from_peft_directory(first, weight=0.7),
        adapter_from_peft_directory(second, weight=-0.4),
    ]
    merge_to_directory(base_dir, inputs, out, device="cpu")
    merged = directory_tensors(out)
    parts = [
        (load_file(str(first / "adapter_model.safetensors")), 1, 0.7),
        (load_file(str(second / "adapter_model.safetensors")), 6, -0.4),
    ]
    for name, value in directory_tensors(base_dir).items():
        want = value.clone()
        for squares, mora_type, weight in parts:
            square = squares.get(f"{PREFIX}{name[: -len('.weight')]}.lora_A.weight")
            if square is not None:
                out_f, in_f = value.shape
                want += weight * fork_delta_weight(square, in_f, out_f, mora_type)
        assert (merged[name] - want).abs().max() <= TOLERANCE, name


def test_hotswap_merged_mode_serves_mora_and_unmerged_refuses(tmp_path: Path) -> None:
    directory = save_mora(tmp_path / "mora", r=4, mora_type=1)
    ids = sample_ids()
    with torch.no_grad():
        want = reference_model(directory)(input_ids=ids).logits
    model = tiny_llama()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with AdapterHost(model, HostConfig(targets="all-linear", mode="merged")) as host:
        host.swap(directory)
        with torch.no_grad():
            got = model(input_ids=ids).logits
        assert (got - want).abs().max() <= 1e-5
        host.unload()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in original.items())
    unmerged = AdapterHost(tiny_llama(), HostConfig(targets="all-linear", max_rank=32))
    with unmerged as host, pytest.raises(UnsupportedAdapter, match="mode='merged' serves it"):
        host.swap(directory)


# --- registry: push --base, show, pull --format peft -------------------------------------


def test_push_against_base_show_and_pull_round_trip(cli: CliEnv, tmp_path: Path) -> None:
    base_dir = save_base(tiny_llama(), tmp_path / "base")
    base_ref = "acme/bases/tiny-llama:v1"
    assert cli.run("base", "push", str(base_dir), base_ref).exit_code == 0
    directory = save_mora(tmp_path / "mora", r=4, mora_type=6)
    (directory / "README.md").write_text("# mora\n")
    pushed = cli.run("push", str(directory), "acme/mora:v1", "--base", base_ref, "-q")
    assert pushed.exit_code == 0, pushed.output
    with Client(cli.env["PEFTREG_URL"]) as client:
        detail = client.version("acme/mora:v1")
    assert detail.adapter is not None
    assert detail.adapter.verified is True
    assert detail.manifest["annotations"]["io.peftreg.adapter.kind"] == "mora"

    shown = cli.run("show", "acme/mora:v1")
    assert shown.exit_code == 0, shown.output
    assert "mora (MoRA type 6: RoPE)" in shown.stdout
    assert "mora:          type 6, r=4: square matrices up to 20x20" in shown.stdout

    out = tmp_path / "pulled"
    pulled = cli.run("pull", "acme/mora:v1", "--format", "peft", "-o", str(out), "-q")
    assert pulled.exit_code == 0, pulled.output
    assert "load it with peft-mora" in pulled.stderr
    assert (out / "adapter_model.safetensors").read_bytes() == (
        directory / "adapter_model.safetensors"
    ).read_bytes()
    assert (out / "README.md").read_text() == "# mora\n"
    original = json.loads((directory / "adapter_config.json").read_text())
    written = json.loads((out / "adapter_config.json").read_text())
    assert written.pop("base_model_name_or_path") == base_ref
    assert written.pop("peftreg_base")["reference"] == base_ref
    original.pop("base_model_name_or_path")
    assert written == original
    assert read_peft_directory(out).config.kind == "mora"

    # Squares sized for another rank than the config's r do not fit the base.
    wrong = save_mora(tmp_path / "wrong", r=4, mora_type=1, side_rank=2)
    refused = cli.subprocess("push", str(wrong), "acme/mora:wrong", "--base", base_ref)
    assert refused.returncode != 0
    assert "model.layers.0.mlp.down_proj" in refused.stderr, refused.stderr
    assert "has shape [14, 14] but the base needs [20, 20]" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_export_job_merges_mora_exactly(server: RegistryProcess, tmp_path: Path) -> None:
    base_dir = save_base(tiny_llama(), tmp_path / "base")
    directory = save_mora(tmp_path / "mora", r=2, mora_type=1, seed=5)
    client = Client(server.url, cache=tmp_path / "cache")
    push_base(client, base_dir, "acme/bases/export:v1")
    client.push(
        directory, "acme/mora-export:v1", base=client.base_reference("acme/bases/export:v1")
    )
    job, _created = client.export("acme/mora-export:v1", "acme/bases/export:v1")
    done = client.wait_job(job.id, timeout=120.0)
    assert done.result is not None
    output = tmp_path / "merged"
    client.pull(done.result["reference"], output)
    merged = directory_tensors(output)
    squares = load_file(str(directory / "adapter_model.safetensors"))
    for name, value in directory_tensors(base_dir).items():
        square = squares.get(f"{PREFIX}{name[: -len('.weight')]}.lora_A.weight")
        want = value
        if square is not None:
            want = value + fork_delta_weight(square, value.shape[1], value.shape[0], 1)
        assert (merged[name] - want).abs().max() <= TOLERANCE, name
