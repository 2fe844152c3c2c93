"""Int4Encoder: plan/encode agreement, which tensors it quantizes, its quantization_config."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.quantization import QuantizationConfig
from transformers import GPT2Config
from transformers.utils.quantization_config import CompressedTensorsConfig

from peftreg.checkpoint.encoding import TensorEncoder
from peftreg.quantize import (
    Int4Encoder,
    InvalidGroupSize,
    QuantizationError,
    UnknownAlgorithm,
    dequantize,
    linear_weight_names,
    quantize_groups,
    unpack_int4,
)
from peftreg.quantize.linear_layers import linear_layout
from peftreg.sdk.errors import InvalidRequest
from tests.quantize.tiny_int4 import stored_tensors, tiny_llama

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_linear_modules() -> set[str]:
    parents = {"gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
    return {
        f"model.layers.{layer}.{parents.get(name, 'self_attn')}.{name}"
        for layer in range(2)
        for name in PROJECTIONS
    }


def encode_all(
    encoder: TensorEncoder, dtype: torch.dtype, *, tied: bool = False
) -> dict[str, torch.Tensor]:
    model = tiny_llama(tie_word_embeddings=tied)
    written: dict[str, torch.Tensor] = {}
    for name, tensor in stored_tensors(model).items():
        planned = encoder.plan(name, tuple(tensor.shape), dtype)
        encoded = encoder.encode(name, tensor, dtype)
        assert [(entry.name, entry.dtype, entry.shape) for entry in planned] == [
            (key, value.dtype, tuple(value.shape)) for key, value in encoded.items()
        ], name
        written.update(encoded)
    return written


def test_linear_weight_names_come_from_the_architecture() -> None:
    config = tiny_llama().config.to_dict()
    assert linear_weight_names(config) == {
        f"{module}.weight" for module in llama_linear_modules()
    } | {"lm_head.weight"}
    tied = tiny_llama(tie_word_embeddings=True).config.to_dict()
    layout = linear_layout(tied)
    assert layout is not None
    assert layout.tied_modules == {"lm_head"}
    assert "lm_head.weight" not in layout.weights
    # GPT-2's projections are Conv1D, not Linear: compressed-tensors would not quantize them
    gpt2 = GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64).to_dict()
    assert linear_weight_names(gpt2) == set()
    assert linear_weight_names({"model_type": "no-such-architecture"}) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_plan_matches_encode_and_only_linear_weights_are_packed(dtype: torch.dtype) -> None:
    config = tiny_llama().config.to_dict()
    encoder = Int4Encoder.for_model_config(config, group_size=64, algorithm="mse")
    written = encode_all(encoder, dtype)
    packed = {name.removesuffix(".weight_packed") for name in written if name.endswith("_packed")}
    assert packed == llama_linear_modules()
    assert set(encoder.quantized_modules) == packed
    for module in packed:
        assert f"{module}.weight" not in written
        assert written[f"{module}.weight_scale"].dtype == dtype
        assert written[f"{module}.weight_shape"].dtype == torch.int64
    assert written["model.embed_tokens.weight"].dtype == dtype
    assert written["lm_head.weight"].dtype == dtype
    assert written["model.norm.weight"].dtype == dtype
    assert encoder.ignore_list() == ["lm_head"]


def test_encoded_tensors_decode_to_quantize_groups() -> None:
    model = tiny_llama()
    name = "model.layers.1.mlp.down_proj.weight"
    w = model.state_dict()[name]
    encoder = Int4Encoder(group_size=32, algorithm="rtn", linear_weights={name}, device="cpu")
    encoded = encoder.encode(name, w, torch.float16)
    module = name.removesuffix(".weight")
    q, scale = quantize_groups(w, 32, "rtn", torch.float16)
    assert encoded[f"{module}.weight_shape"].tolist() == [128, 320]
    assert torch.equal(unpack_int4(encoded[f"{module}.weight_packed"], 320), q)
    assert torch.equal(encoded[f"{module}.weight_scale"], scale.to(torch.float16))
    decoded = dequantize(q, encoded[f"{module}.weight_scale"], 32)
    step = scale.repeat_interleave(32, dim=1)
    assert bool(((decoded - w).abs() <= 0.51 * step).all())


def test_indivisible_linear_layers_stay_dense_and_are_ignored() -> None:
    config = tiny_llama().config.to_dict()
    encoder = Int4Encoder.for_model_config(config, group_size=128)
    written = encode_all(encoder, torch.bfloat16)
    down = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    for module in down:
        assert written[f"{module}.weight"].shape == (128, 320)
        assert f"{module}.weight_packed" not in written
    assert set(encoder.quantized_modules) == llama_linear_modules() - set(down)
    assert encoder.ignore_list() == ["lm_head", *down]
    assert encoder.config_update()["quantization_config"]["ignore"] == ["lm_head", *down]


def test_quantization_config_is_what_compressed_tensors_and_transformers_read() -> None:
    encoder = Int4Encoder.for_model_config(tiny_llama().config.to_dict(), group_size=128)
    encode_all(encoder, torch.bfloat16)
    update = encoder.config_update()
    assert list(update) == ["quantization_config"]
    raw = update["quantization_config"]
    parsed = QuantizationConfig.model_validate(raw)
    assert parsed.quant_method == "compressed-tensors"
    assert parsed.format == "pack-quantized"
    assert parsed.quantization_status == "compressed"
    assert parsed.ignore == [
        "lm_head",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
    ]
    scheme = parsed.config_groups["group_0"]
    assert scheme.targets == ["Linear"]
    assert scheme.weights is not None
    assert scheme.weights.num_bits == 4
    assert scheme.weights.type == "int"
    assert scheme.weights.symmetric is True
    assert scheme.weights.strategy == "group"
    assert scheme.weights.group_size == 128
    assert scheme.input_activations is None
    assert scheme.format == "pack-quantized"
    wrapped = CompressedTensorsConfig.from_dict(update)
    assert wrapped.quantization_config is not None
    assert wrapped.quantization_config.config_groups["group_0"].weights.group_size == 128


def test_recipe_records_the_parameters() -> None:
    encoder = Int4Encoder(group_size=32, algorithm="mse", ignore=["lm_head", "re:.*o_proj"])
    assert encoder.recipe() == {
        "quantization": "int4",
        "format": "pack-quantized",
        "group_size": 32,
        "algorithm": "mse",
        "symmetric": True,
        "ignore": ["lm_head", "re:.*o_proj"],
    }


def test_ignore_takes_module_names_and_regexes() -> None:
    encoder = Int4Encoder(group_size=64, ignore=["lm_head", "re:.*self_attn\\.o_proj$"])
    written = encode_all(encoder, torch.bfloat16)  # no linear_weights: the name heuristic
    assert set(encoder.quantized_modules) == {
        module for module in llama_linear_modules() if not module.endswith("o_proj")
    }
    assert "model.layers.0.self_attn.o_proj.weight" in written
    assert "model.embed_tokens.weight" in written
    assert encoder.ignore_list() == ["lm_head", "re:.*self_attn\\.o_proj$"]


def test_tied_head_is_ignored_even_when_not_asked() -> None:
    config = tiny_llama(tie_word_embeddings=True).config.to_dict()
    encoder = Int4Encoder.for_model_config(config, group_size=64, ignore=())
    written = encode_all(encoder, torch.bfloat16, tied=True)
    assert "lm_head.weight" not in written
    assert set(encoder.quantized_modules) == llama_linear_modules()
    assert encoder.ignore_list() == ["lm_head"]


def test_linear_layers_never_planned_are_ignored() -> None:
    config = tiny_llama().config.to_dict()
    encoder = Int4Encoder.for_model_config(config, group_size=64)
    name = "model.layers.0.self_attn.q_proj.weight"
    encoder.plan(name, (128, 128), torch.bfloat16)
    ignored = encoder.ignore_list()
    assert ignored[0] == "lm_head"
    assert set(ignored[1:]) == llama_linear_modules() - {"model.layers.0.self_attn.q_proj"}


@pytest.mark.parametrize("group_size", [0, 20, -1])
def test_encoder_refuses_bad_settings(group_size: int) -> None:
    with pytest.raises(InvalidGroupSize, match="positive multiple of 8") as caught:
        Int4Encoder(group_size=group_size)
    assert isinstance(caught.value, InvalidRequest)
    with pytest.raises(UnknownAlgorithm, match="expected one of rtn, mse"):
        Int4Encoder(algorithm="hqq")  # type: ignore[arg-type]


def test_encoder_refuses_bad_ignore_entries() -> None:
    with pytest.raises(QuantizationError, match="not a valid regex"):
        Int4Encoder(ignore=["re:(unclosed"])
    with pytest.raises(QuantizationError, match="list of module names"):
        Int4Encoder(ignore="lm_head")


def test_a_checkpoint_with_nothing_quantized_is_refused() -> None:
    too_large = Int4Encoder.for_model_config(tiny_llama().config.to_dict(), group_size=512)
    encode_all(too_large, torch.bfloat16)
    with pytest.raises(QuantizationError, match="not divisible by the group size 512"):
        too_large.config_update()
    gpt2 = GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64)
    conv1d_only = Int4Encoder.for_model_config(gpt2.to_dict(), group_size=32)
    conv1d_only.plan("transformer.h.0.attn.c_attn.weight", (32, 96), torch.bfloat16)
    with pytest.raises(QuantizationError, match=r"no torch\.nn\.Linear weights"):
        conv1d_only.config_update()


def test_a_new_plan_sequence_forgets_the_previous_checkpoint() -> None:
    """plan* then config_update describes one checkpoint; the next plan starts afresh."""
    config = tiny_llama().config.to_dict()
    encoder = Int4Encoder.for_model_config(config, group_size=128)
    encode_all(encoder, torch.bfloat16)
    first = encoder.config_update()["quantization_config"]["ignore"]
    assert first == ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    only = "model.layers.0.self_attn.q_proj.weight"
    encoder.plan(only, (128, 128), torch.bfloat16)
    assert encoder.quantized_modules == ["model.layers.0.self_attn.q_proj"]
    second = encoder.config_update()["quantization_config"]["ignore"]
    # Nothing of the first checkpoint remains: every other Linear was never planned.
    assert second[0] == "lm_head"
    assert set(second[1:]) == llama_linear_modules() - {"model.layers.0.self_attn.q_proj"}
    encode_all(encoder, torch.bfloat16)  # a third, whole checkpoint: the first's record again
    assert encoder.config_update()["quantization_config"]["ignore"] == first


def test_architectures_that_fail_to_build_fall_back_to_names() -> None:
    config = tiny_llama().config.to_dict()
    # An architecture name that is a transformers class but not a model: not instantiated.
    not_a_model = {**config, "architectures": ["LlamaConfig", "LlamaForCausalLM"]}
    assert linear_weight_names(not_a_model) == linear_weight_names(config)
    only_config = {**config, "architectures": ["LlamaConfig"]}  # AutoModelForCausalLM then
    assert linear_weight_names(only_config) == linear_weight_names(config)
    # Any exception while building on the meta device means: find Linear layers by name.
    broken = {**config, "num_attention_heads": 0}
    assert linear_weight_names(broken) is None
    encoder = Int4Encoder.for_model_config(broken, group_size=64)
    q_proj = encoder.plan("model.layers.0.self_attn.q_proj.weight", (128, 128), torch.bfloat16)
    assert [t.name.rsplit(".", 1)[1] for t in q_proj] == [
        "weight_packed",
        "weight_scale",
        "weight_shape",
    ]
    embed = encoder.plan("model.embed_tokens.weight", (256, 128), torch.float32)
    assert [t.name for t in embed] == ["model.embed_tokens.weight"]
