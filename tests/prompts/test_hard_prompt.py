"""Hard prompts: templates validated, bound to a base's tokenizer, versioned, shown, pulled."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from peftreg import Client
from peftreg.digest import digest_file
from peftreg.manifest import OCI_MANIFEST, PROMPT_ARTIFACT, canonical_json
from peftreg.prompts.package import build_prompt_config, local_tokenizer
from peftreg.prompts.schema import (
    MAX_PROMPT_BYTES,
    PROMPT_CONFIG_MEDIA_TYPE,
    PROMPT_FILE,
    PROMPT_TEXT_MEDIA_TYPE,
)
from peftreg.prompts.template import PromptInvalid, decode_template, placeholders, render
from peftreg.sdk.errors import InvalidRequest, PeftregError
from peftreg.transfer.push import LocalFile, build_manifest
from tests.adapters.tiny_models import tiny_llama
from tests.fixtures.cli import CliEnv
from tests.fixtures.schemas import assert_valid_config

TEMPLATE = "You answer questions about the product.\nQuestion: {input}\nAnswer in {language}.\n"
WORDS = [
    "you answer questions about the product",
    "question answer in english",
    "language input the a",
]


def word_tokenizer(directory: Path, words: list[str]) -> Path:
    """A WordLevel tokenizer trained on `words`, saved as `directory`/tokenizer.json."""
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[UNK]"], show_progress=False)
    tokenizer.train_from_iterator(words, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


def direct_ids(directory: Path, text: str) -> list[int]:
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    return list(tokenizer.encode(text, add_special_tokens=False).ids)


# --- templates ------------------------------------------------------------------------------


def test_placeholders_and_rendering() -> None:
    assert placeholders(TEMPLATE) == ["input", "language"]
    assert placeholders("literal {{braces}} and {x} then {x}") == ["x"]
    rendered = render(TEMPLATE, {"input": "what is {it}?", "language": "English"})
    assert "Question: what is {it}?\n" in rendered
    with pytest.raises(PromptInvalid, match="no value for placeholder"):
        render(TEMPLATE, {"input": "x"})
    with pytest.raises(PromptInvalid, match="has no placeholder"):
        render(TEMPLATE, {"input": "x", "language": "y", "tone": "z"})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{0}", "is not a bare"),
        ("{user.name}", "is not a bare"),
        ("{x!r}", "is not a bare"),
        ("{x:>10}", "is not a bare"),
        ("open { brace", "do not parse"),
    ],
    ids=["positional", "attribute", "conversion", "format-spec", "unbalanced"],
)
def test_bad_placeholders_are_refused(text: str, message: str) -> None:
    with pytest.raises(PromptInvalid, match=message):
        placeholders(text)


def test_text_checks() -> None:
    assert decode_template("héllo {x}".encode()) == "héllo {x}"
    with pytest.raises(PromptInvalid, match="not UTF-8: byte 1"):
        decode_template(b"a\xff")
    with pytest.raises(PromptInvalid, match="limited to"):
        decode_template(b"a" * (MAX_PROMPT_BYTES + 1))
    with pytest.raises(PromptInvalid, match="empty"):
        decode_template(b"  \n")
    with pytest.raises(PromptInvalid, match="NUL"):
        decode_template(b"a\x00b")


# --- through a registry ---------------------------------------------------------------------


def _base_with_tokenizer(cli: CliEnv, root: Path, ref: str) -> Path:
    directory = root / "base"
    tiny_llama().save_pretrained(str(directory), safe_serialization=True)
    word_tokenizer(directory, WORDS)
    pushed = cli.run("base", "push", str(directory), ref)
    assert pushed.exit_code == 0, pushed.output
    return directory


def test_push_show_tag_pull_diff_and_load(cli: CliEnv, tmp_path: Path) -> None:
    base_ref = "acme/bases/tiny:v1"
    base_dir = _base_with_tokenizer(cli, tmp_path, base_ref)
    prompt = tmp_path / "support.txt"
    prompt.write_text(TEMPLATE, encoding="utf-8")
    ref = "acme/prompts/support:v1"
    pushed = cli.run(
        "push", str(prompt), ref, "--kind", "hard-prompt", "--base", base_ref, "--json"
    )
    assert pushed.exit_code == 0, pushed.output
    payload = json.loads(pushed.stdout)
    tokens = len(direct_ids(base_dir, TEMPLATE))
    assert payload["token_count"] == tokens
    assert payload["placeholders"] == ["input", "language"]

    shown = cli.run("show", ref)
    assert shown.exit_code == 0, shown.output
    assert "kind:          hard_prompt" in shown.stdout
    assert f"tokens:        {tokens}" in shown.stdout
    assert "(verified)" in shown.stdout
    assert "  Question: {input}" in shown.stdout
    assert "placeholders:  input, language" in shown.stdout

    page = httpx.get(f"{cli.env['PEFTREG_URL']}/ui/r/acme/prompts/support/-/versions/v1")
    assert page.status_code == 200, page.text[:200]
    assert "Question: {input}" in page.text
    assert f'data-testid="tokens">{tokens}<' in page.text

    listed = cli.run("ls", "acme", "--kind", "hard_prompt")
    assert listed.exit_code == 0, listed.output
    assert "acme/prompts/support" in listed.stdout
    assert "hard_prompt" in listed.stdout
    assert cli.run("tag", ref, "acme/prompts/support:prod").exit_code == 0

    out = tmp_path / "pulled"
    pulled = cli.run("pull", "acme/prompts/support:prod", "-o", str(out), "-q")
    assert pulled.exit_code == 0, pulled.output
    assert (out / PROMPT_FILE).read_bytes() == prompt.read_bytes()

    with Client(cli.env["PEFTREG_URL"], cache=tmp_path / "sdk-cache") as client:
        loaded = client.hard_prompt("acme/prompts/support:prod")
        detail = client.version(ref)
    assert detail.adapter is not None
    assert detail.adapter.kind == "hard_prompt"
    assert detail.adapter.verified is True
    assert loaded.text == TEMPLATE
    assert_valid_config(loaded.config.model_dump(mode="json"), PROMPT_CONFIG_MEDIA_TYPE)
    assert loaded.token_count == tokens
    values = {"input": "the product", "language": "english"}
    assert loaded.render(**values) == TEMPLATE.format(**values)
    assert loaded.token_ids(base_dir, **values) == direct_ids(base_dir, TEMPLATE.format(**values))
    other = word_tokenizer(tmp_path / "other", ["completely different words"])
    with pytest.raises(InvalidRequest, match="is bound to tokenizer"):
        loaded.token_ids(other, **values)

    second = tmp_path / "support2.txt"
    second.write_text(TEMPLATE.replace("Answer in", "Reply in"), encoding="utf-8")
    assert cli.run("push", str(second), "acme/prompts/support:v2", "--kind", "hard-prompt",
                   "--base", base_ref).exit_code == 0  # fmt: skip
    diffed = cli.run("diff", ref, "acme/prompts/support:v2")
    assert diffed.exit_code == 0, diffed.output
    assert "kind:         hard_prompt\n" in diffed.stdout
    assert "-Answer in {language}." in diffed.stdout
    assert "+Reply in {language}." in diffed.stdout


def test_refusals(cli: CliEnv, tmp_path: Path) -> None:
    base_ref = "acme/bases/tiny:v2"
    _base_with_tokenizer(cli, tmp_path, base_ref)
    other = word_tokenizer(tmp_path / "other", ["completely different words"])
    prompt = tmp_path / "p.txt"
    prompt.write_text(TEMPLATE, encoding="utf-8")

    mismatch = cli.run(
        "push", str(prompt), "acme/prompts/x:v1", "--kind", "hard-prompt",
        "--base", base_ref, "--tokenizer", str(other),
    )  # fmt: skip
    assert mismatch.exit_code == 1
    assert "is not the base" in mismatch.stderr

    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"caf\xe9 {input}")
    refused = cli.run("push", str(binary), "acme/prompts/x:v1", "--kind", "hard-prompt")
    assert refused.exit_code == 1
    assert "is not UTF-8" in refused.stderr

    unbound = cli.run("push", str(prompt), "acme/prompts/x:v1", "--kind", "hard-prompt", "--json")
    assert unbound.exit_code == 0, unbound.output
    assert json.loads(unbound.stdout)["token_count"] is None

    # The registry checks the binding itself: a prompt claiming the base with another
    # tokenizer's identity is refused with 422, whoever pushes it.
    with Client(cli.env["PEFTREG_URL"], cache=tmp_path / "c") as client:
        base = client.base_reference(base_ref)
        config = build_prompt_config(TEMPLATE, base=base, tokenizer=local_tokenizer(other))
        config_bytes = canonical_json(config.model_dump(mode="json"))
        digest, size = digest_file(prompt)
        client.upload_blob("acme/prompts/x", config_bytes)
        client.upload_blob("acme/prompts/x", prompt, digest)
        manifest = build_manifest(
            [LocalFile(PROMPT_FILE, prompt, digest, size, PROMPT_TEXT_MEDIA_TYPE)],
            PROMPT_ARTIFACT,
            None,
            (PROMPT_CONFIG_MEDIA_TYPE, config_bytes),
        )
        with pytest.raises(PeftregError, match="is bound to tokenizer") as caught:
            client.put_manifest("acme/prompts/x:forged", manifest, OCI_MANIFEST)
    assert caught.value.status == 422
    assert caught.value.code == "ADAPTER_INVALID"
