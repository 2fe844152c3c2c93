"""Every adapter type of the installed peft, from peft's own list, through peftreg.

For each `peft.PeftType`: build it on a tiny Llama with peft, push it with `--base`
(checked against the base's architecture and by the registry), pull it back with
`--format peft` and load it with `PeftModel.from_pretrained` (logits within 1e-6 of
the adapter as trained), merge it (peft's `merge_and_unload` within 1e-6, or the
refusal stated in the table) and hot-swap it in both modes (peft's logits within
1e-5, or a refusal naming the type and the mode that serves it; a multitask prompt
one task at a time). A type that a later peft adds has no row in
`TABLE` and fails here until it is handled or explicitly refused.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import PeftType
from safetensors.torch import load_file, save

from peftreg import Client
from peftreg.adapters.peft_import import read_peft_directory
from peftreg.adapters.schema import AdaptedModule, AdapterConfig, BaseReference, TensorSpec
from peftreg.adapters.validate import AdapterInvalid, validate_adapter
from peftreg.formats.safetensors_header import read_header
from peftreg.hotswap import AdapterHost, HostConfig, SwapError
from peftreg.merge import MergeError, adapter_from_peft_directory, merge_to_directory
from tests.adapters.documents import assert_document_is_the_model
from tests.adapters.tiny_models import sample_ids, tiny_llama
from tests.artifacts.conftest import error, push_adapter
from tests.fixtures.cli import CliEnv
from tests.merge.builders import TOLERANCE, directory_tensors, max_difference, peft_merged

TARGETS = ["q_proj", "v_proj"]
NOTHING_TO_MERGE = "adds virtual tokens, not weight changes"
NOT_MERGED = "does not merge"
NOT_SWAPPED = "adapter cannot be hot-swapped in unmerged or merged mode"
MERGED_ONLY = {"unmerged": "adapter cannot be hot-swapped in unmerged mode", "merged": "exact"}
BOTH = {"unmerged": "exact", "merged": "exact"}
PROMPT_KINDS = ("prompt_tuning", "p_tuning", "multitask_prompt_tuning")
DERIVED = "derives part of its layers from the base weights when it loads the adapter"


@dataclass(frozen=True)
class Row:
    """How one peft type is built here and what peftreg does with it."""

    config: dict[str, Any] | None  # the config's arguments; None: not built in this test
    merge: str = NOT_MERGED  # "exact", or the refusal's words
    swap: dict[str, str] = field(
        default_factory=lambda: {"unmerged": NOT_SWAPPED, "merged": NOT_SWAPPED}
    )
    not_built: str = ""  # why the test cannot build it
    host_targets: tuple[str, ...] = tuple(TARGETS)  # what the exact hot-swap host attaches to
    tasks: int = 0  # a multitask prompt: each task is swapped in and compared
    modules_in_tensors: bool = True  # False: the saved tensors do not name the modules


LINEAR = {"target_modules": TARGETS}
PROMPT = {"num_virtual_tokens": 4}
TABLE: dict[str, Row] = {
    "LORA": Row({**LINEAR, "r": 4, "lora_alpha": 8}, "exact", BOTH),
    "PROMPT_TUNING": Row(PROMPT, NOTHING_TO_MERGE, BOTH),
    "PREFIX_TUNING": Row(PROMPT, NOTHING_TO_MERGE),
    "P_TUNING": Row({**PROMPT, "encoder_hidden_size": 16}, NOTHING_TO_MERGE, BOTH),
    "MULTITASK_PROMPT_TUNING": Row({**PROMPT, "num_tasks": 2}, NOTHING_TO_MERGE, BOTH, tasks=2),
    "CPT": Row({}, NOTHING_TO_MERGE),
    "CARTRIDGE": Row(PROMPT, NOTHING_TO_MERGE),
    "ADAPTION_PROMPT": Row({"adapter_len": 4, "adapter_layers": 1}, NOTHING_TO_MERGE),
    "ADALORA": Row({**LINEAR, "r": 4, "total_step": 10}, "exact", MERGED_ONLY),
    "ADAMSS": Row(None, not_built="peft builds AdaMSS with scikit-learn, not installed"),
    "BOFT": Row(LINEAR, "exact", MERGED_ONLY),
    "IA3": Row(
        {"target_modules": [*TARGETS, "down_proj"], "feedforward_modules": ["down_proj"]},
        "exact",
        BOTH,
        host_targets=(*TARGETS, "down_proj"),
    ),
    "BEFT": Row(
        {},
        "Base layer has no bias, cannot merge bias adapter",
        {"unmerged": MERGED_ONLY["unmerged"], "merged": "adapter into"},
    ),
    "LILY": Row({}, "do not merge"),
    "LOHA": Row({**LINEAR, "r": 4}, "exact", MERGED_ONLY),
    "LOKR": Row({**LINEAR, "r": 4}, "exact", MERGED_ONLY),
    "OFT": Row(LINEAR, "exact", MERGED_ONLY),
    "POLY": Row({**LINEAR, "r": 4, "n_tasks": 2}, "no one weight change exists"),
    "LN_TUNING": Row(
        {},
        "exact",
        {"unmerged": MERGED_ONLY["unmerged"], "merged": "layers adapt model.layers.0.input_"},
    ),
    "VERA": Row({**LINEAR, "r": 4}, "exact", MERGED_ONLY),
    "FROD": Row(LINEAR, DERIVED),
    "PVERA": Row({**LINEAR, "r": 4}, "exact", MERGED_ONLY),
    "FOURIERFT": Row({**LINEAR, "n_frequency": 16}, "exact", MERGED_ONLY),
    "GLORA": Row({**LINEAR, "r": 4}, "exact", MERGED_ONLY),
    "XLORA": Row(None, not_built="X-LoRA is built from trained LoRA adapters on disk"),
    "HRA": Row({**LINEAR, "r": 4}, "exact", MERGED_ONLY),
    "VBLORA": Row({**LINEAR, "r": 4, "vector_length": 16, "num_vectors": 32}, "exact", MERGED_ONLY),
    # UniLoRA saves only its shared vector: its modules come back from the config and seed.
    "UNILORA": Row(LINEAR, "exact", MERGED_ONLY, modules_in_tensors=False),
    "MISS": Row({**LINEAR, "r": 4}, "exact", MERGED_ONLY),
    "RANDLORA": Row({**LINEAR, "r": 4}, "exact", MERGED_ONLY),
    "ROAD": Row({**LINEAR, "group_size": 8}, "exact", MERGED_ONLY),
    "TRAINABLE_TOKENS": Row(
        {"token_indices": [1, 2, 3]}, "exact", MERGED_ONLY, host_targets=("embed_tokens",)
    ),
    "HIRA": Row({**LINEAR, "r": 4}, "exact", MERGED_ONLY),
    "SHIRA": Row({**LINEAR, "r": 4}, "exact", MERGED_ONLY),
    "C3A": Row({**LINEAR, "block_size": 16}, "exact", MERGED_ONLY),
    "WAVEFT": Row({**LINEAR, "n_frequency": 16}, "exact", MERGED_ONLY),
    "OSF": Row({}, DERIVED),
    "DELORA": Row({**LINEAR, "r": 4}, "exact", MERGED_ONLY),
    "GRALORA": Row({**LINEAR, "r": 4}, "exact", MERGED_ONLY),
    "TINYLORA": Row(LINEAR, "exact", MERGED_ONLY),
    "PSOFT": Row({**LINEAR, "r": 4}, DERIVED),
    "PEANUT": Row(LINEAR, "exact", MERGED_ONLY),
    "SHADOW": Row({}, "depends on the input"),
    "SUPERTUNING": Row(LINEAR, "exact", MERGED_ONLY),
    "DEFT": Row(LINEAR, "exact", MERGED_ONLY),
}
PEFT_TYPES = sorted(t.value for t in PeftType)


def test_the_table_has_a_row_for_every_type_of_the_installed_peft() -> None:
    assert sorted(TABLE) == PEFT_TYPES


@pytest.fixture(scope="module")
def base_dir(module_cli: CliEnv, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("base")
    tiny_llama().save_pretrained(str(directory), safe_serialization=True)
    pushed = module_cli.run("base", "push", str(directory), "acme/bases/llama:v1")
    assert pushed.exit_code == 0, pushed.output
    return directory


@pytest.fixture(scope="module")
def hosts() -> Iterator[dict[str, AdapterHost]]:
    """A host per mode for the refusals (a refused swap leaves it as it was)."""
    made = {
        mode: AdapterHost(tiny_llama(), HostConfig(targets=TARGETS, mode=mode))  # type: ignore[arg-type]
        for mode in ("unmerged", "merged")
    }
    yield made
    for host in made.values():
        host.detach()


def _train(model: torch.nn.Module) -> None:
    """Stand-in for training: move every trainable parameter a little."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)


TASK_TYPES = ("MULTITASK_PROMPT_TUNING", "POLY")  # whose forward takes task ids


def _logits(
    model: torch.nn.Module, peft_type: str = "", tasks: tuple[int, int] = (0, 1)
) -> torch.Tensor:
    ids = sample_ids()
    extra = {"task_ids": torch.tensor(tasks)} if peft_type in TASK_TYPES else {}
    with torch.no_grad():
        return model(input_ids=ids, **extra).logits  # type: ignore[no-any-return]


@pytest.mark.parametrize("peft_type", PEFT_TYPES)
def test_peft_type(
    peft_type: str,
    module_cli: CliEnv,
    base_dir: Path,
    hosts: dict[str, AdapterHost],
    tmp_path: Path,
) -> None:
    row = TABLE.get(peft_type)
    assert row is not None, f"peft type {peft_type} has no row: handle it or refuse it"
    if row.config is None:
        assert row.not_built
        return
    kind = peft_type.lower()
    config = PEFT_TYPE_TO_CONFIG_MAPPING[peft_type](task_type="CAUSAL_LM", **row.config)
    trained = get_peft_model(tiny_llama(), config)
    _train(trained)
    trained.eval()
    source = tmp_path / "source"
    trained.save_pretrained(str(source))
    assert_document_is_the_model(read_peft_directory(source))

    ref = f"acme/types/{kind.replace('_', '-')}:v1"
    pushed = module_cli.run("push", str(source), ref, "--base", "acme/bases/llama:v1", "-q")
    assert pushed.exit_code == 0, pushed.output
    with Client(module_cli.env["PEFTREG_URL"]) as client:
        adapter = client.version(ref).adapter
    assert adapter is not None
    assert (adapter.kind, adapter.verified) == (kind, True)
    found = httpx.get(f"{module_cli.env['PEFTREG_URL']}/api/v1/versions", params={"kind": kind})
    assert [item["repository"] for item in found.json()["items"]] == [ref.partition(":")[0]]
    _assert_recorded_modules(module_cli, ref, trained, row)

    pulled = tmp_path / "pulled"
    result = module_cli.run("pull", ref, "--format", "peft", "-o", str(pulled), "-q")
    assert result.exit_code == 0, result.output
    loaded = PeftModel.from_pretrained(tiny_llama(), str(pulled)).eval()
    difference = _logits(loaded, peft_type) - _logits(trained, peft_type)
    assert difference.abs().max().item() <= 1e-6

    if row.merge == "exact":
        merge_to_directory(base_dir, [adapter_from_peft_directory(pulled)], tmp_path / "merged")
        want = peft_merged(tiny_llama(), pulled).state_dict()
        assert max_difference(directory_tensors(tmp_path / "merged"), want) <= TOLERANCE
    else:
        with pytest.raises(MergeError, match=re.escape(row.merge)):
            merge_to_directory(base_dir, [adapter_from_peft_directory(pulled)], tmp_path / "m")
        assert not (tmp_path / "m").exists()

    for mode, expected in row.swap.items():
        if expected != "exact":
            with pytest.raises(SwapError, match=f"{kind} {expected}"):
                hosts[mode].swap(pulled)
            assert hosts[mode].active is None
            continue
        tokens = 4 if kind in PROMPT_KINDS else 0
        host_config = HostConfig(
            targets=list(row.host_targets),
            max_rank=8,
            mode=mode,  # type: ignore[arg-type]
            max_virtual_tokens=tokens,
        )
        model = tiny_llama()
        original = {name: value.clone() for name, value in model.state_dict().items()}
        with AdapterHost(model, host_config) as host:
            for task in range(row.tasks) if row.tasks else (None,):
                host.swap(pulled, task_id=task)
                every = (0, 0) if task is None else (task, task)  # peft: each row's task
                got, want = _logits(model)[:, tokens:], _logits(loaded, peft_type, every)
                assert (got - want[:, tokens:]).abs().max().item() <= 1e-5, (mode, task)
            host.unload()
            after = model.state_dict()
            assert all(torch.equal(value, after[name]) for name, value in original.items())


def _stored_config(url: str, ref: str) -> AdapterConfig:
    with Client(url) as client:
        detail = client.version(ref)
        digest = str(detail.manifest["config"]["digest"])
        return AdapterConfig.model_validate_json(client.get_blob(ref.partition(":")[0], digest))


def _assert_recorded_modules(module_cli: CliEnv, ref: str, trained: Any, row: Row) -> None:
    """The stored config lists the modules peft adapted (its tuner layers), and `show`
    prints them with their ranks."""
    config = _stored_config(module_cli.env["PEFTREG_URL"], ref)
    adapted = sorted(
        name.removeprefix("base_model.model.")
        for name, module in trained.named_modules()
        if isinstance(module, BaseTunerLayer)
    )
    listed = [*(t.module for t in config.targets), *(m.module for m in config.modules)]
    assert listed == (adapted if row.modules_in_tensors else [])
    shown = module_cli.run("show", ref)
    assert shown.exit_code == 0, shown.output
    assert f"targets:       {len(listed)}\n" in shown.output
    for module in config.modules:
        rank = "" if module.rank is None else f"  r={module.rank}"
        assert f"  {module.module}{rank}\n" in shown.output


def test_a_generic_adapter_that_does_not_fit_the_architecture_is_refused(
    module_cli: CliEnv, base_dir: Path, tmp_path: Path
) -> None:
    """The config claims rank 8 for factors of rank 4: peft on the base's architecture
    makes other shapes, and the push names the tensor before uploading anything."""
    config = PEFT_TYPE_TO_CONFIG_MAPPING["LOHA"](task_type="CAUSAL_LM", r=4, target_modules=TARGETS)
    get_peft_model(tiny_llama(), config).save_pretrained(str(tmp_path / "loha"))
    document = json.loads((tmp_path / "loha" / "adapter_config.json").read_text())
    (tmp_path / "loha" / "adapter_config.json").write_text(json.dumps({**document, "r": 8}))
    refused = module_cli.run(
        "push", str(tmp_path / "loha"), "acme/types/bad-loha:v1", "--base", "acme/bases/llama:v1"
    )
    assert refused.exit_code != 0
    assert "hada_w1_a' has shape [32, 4], but peft makes [32, 8]" in refused.output
    assert "acme/bases/llama:v1" in refused.output
    assert "Traceback" not in refused.output
    with Client(module_cli.env["PEFTREG_URL"]) as client:
        assert "acme/types/bad-loha" not in client.catalog()


def test_the_registry_checks_generic_tensor_names() -> None:
    tensors = {"model.layers.0.mlp.ia3_l": torch.ones(4, 1)}
    header = read_header(io.BytesIO(data := save(tensors)), len(data))
    config = AdapterConfig(
        kind="ia3",
        base=BaseReference(),
        dtype="F32",
        parameters=4,
        bytes=16,
        tensors=[TensorSpec(name="model.layers.0.mlp.ia3_l", dtype="F32", shape=(4, 1))],
        peft_config={"peft_type": "IA3"},
    )
    with pytest.raises(AdapterInvalid, match="not a peft adapter tensor name"):
        validate_adapter(config, header, lambda _name: iter(()), None)


def _ia3_directory(path: Path) -> Path:
    config = PEFT_TYPE_TO_CONFIG_MAPPING["IA3"](
        task_type="CAUSAL_LM", target_modules=TARGETS, feedforward_modules=[]
    )
    get_peft_model(tiny_llama(), config).save_pretrained(str(path))
    return path


@pytest.mark.parametrize(
    ("forge", "named"),
    [
        ("drop", "model.layers.1.self_attn.v_proj"),
        ("add", "model.layers.1.mlp.up_proj"),
    ],
)
def test_a_config_whose_modules_the_tensors_do_not_adapt_is_refused(
    module_cli: CliEnv, tmp_path: Path, forge: str, named: str
) -> None:
    """The registry derives the modules from the tensor names and refuses other ones."""
    imported = read_peft_directory(_ia3_directory(tmp_path / "ia3"))
    modules = [m for m in imported.config.modules if m.module != named]
    if forge == "add":
        modules.append(AdaptedModule(module=named))
    forged = imported.config.model_copy(update={"modules": modules})
    with httpx.Client(base_url=module_cli.env["PEFTREG_URL"], timeout=60) as http:
        response = push_adapter(
            http, "acme/types/forged-ia3", forge, forged, imported.tensors_path.read_bytes()
        )
    assert response.status_code == 422, response.text
    code, message = error(response)
    assert code == "ADAPTER_INVALID"
    assert repr(named) in message


def test_a_generic_module_the_base_lacks_is_refused(
    module_cli: CliEnv, base_dir: Path, tmp_path: Path
) -> None:
    """Tensors and modules agree, but the base has no such module: refused naming it."""
    imported = read_peft_directory(_ia3_directory(tmp_path / "ia3"))
    tensors = load_file(str(imported.tensors_path))
    renamed = {
        name.replace("layers.1.self_attn.v_proj", "layers.1.self_attn.x_proj"): value
        for name, value in tensors.items()
    }
    data = save(renamed)
    header = read_header(io.BytesIO(data), len(data))
    with Client(module_cli.env["PEFTREG_URL"]) as client:
        base = client.version("acme/bases/llama:v1")
        base_config = json.loads(
            client.get_blob("acme/bases/llama", str(base.manifest["config"]["digest"]))
        )
    config = imported.config.model_copy(
        update={
            "modules": [
                m.model_copy(update={"module": m.module.replace("v_proj", "x_proj")})
                if m.module == "model.layers.1.self_attn.v_proj"
                else m
                for m in imported.config.modules
            ],
            "tensors": [
                TensorSpec(name=name, dtype=entry.dtype, shape=entry.shape)
                for name, entry in sorted(header.tensors.items())
            ],
            "base": BaseReference(fingerprint=base_config["fingerprint"]),
        }
    )
    with httpx.Client(base_url=module_cli.env["PEFTREG_URL"], timeout=60) as http:
        response = push_adapter(http, "acme/types/off-base-ia3", "v1", config, data)
    assert response.status_code == 422, response.text
    code, message = error(response)
    assert code == "ADAPTER_INVALID"
    assert "'model.layers.1.self_attn.x_proj' is not a module of the base" in message


def test_diff_and_the_version_page_list_a_generic_adapters_modules(
    module_cli: CliEnv, tmp_path: Path
) -> None:
    """Two LoHa versions, the second adapting down_proj too: `diff` names the added
    modules, the version page lists each module with its rank."""
    for tag, targets in (("v1", TARGETS), ("v2", [*TARGETS, "down_proj"])):
        config = PEFT_TYPE_TO_CONFIG_MAPPING["LOHA"](
            task_type="CAUSAL_LM", r=4, rank_pattern={"down_proj": 2}, target_modules=targets
        )
        get_peft_model(tiny_llama(), config).save_pretrained(str(tmp_path / tag))
        pushed = module_cli.run("push", str(tmp_path / tag), f"acme/diff/loha:{tag}", "-q")
        assert pushed.exit_code == 0, pushed.output
    result = module_cli.run("diff", "acme/diff/loha:v1", "acme/diff/loha:v2")
    assert result.exit_code == 0, result.output
    added = [line for line in result.output.splitlines() if line.startswith("+ target ")]
    assert added == [f"+ target model.layers.{i}.mlp.down_proj" for i in (0, 1)]
    page = httpx.get(f"{module_cli.env['PEFTREG_URL']}/ui/r/acme/diff/loha/-/versions/v2")
    assert page.status_code == 200, page.text
    assert "Targets (6)" in page.text
    assert "<td><code>model.layers.1.mlp.down_proj</code></td><td>-</td><td>2</td>" in page.text
    assert "<td><code>model.layers.1.self_attn.q_proj</code></td><td>-</td><td>4</td>" in page.text
