"""What a push and a pull load: the modules they do not need stay unimported.

Start-up is most of a small transfer's time; these guard the lazy imports
(figures are in benchmarks/bench_transfer.py, not here). Real processes,
`python -X importtime`, against the test registry.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
from safetensors.numpy import save_file

from tests.fixtures.cli import CliEnv

NEVER_FOR_TRANSFERS = {
    "peftreg.sdk.jobs",  # job commands only
    "peftreg.adapters.schema",  # models: a push builds an adapter's config as plain data
    "rich",  # by httpx's own command line, which the CLI stops httpx from loading
    "filelock",  # the cache locks with flock itself (peftreg.file_lock)
    "torch",
    "pydantic",  # the registry's models: a pull reads manifests with peftreg.transfer.layers
    "peftreg.manifest",
    "peftreg.sdk.models",  # the typed answers of the catalog API
    "ctypes.util",  # find_library runs `ldconfig -p`: peftreg.writeback uses loaded symbols
    "subprocess",  # no other program runs in a transfer
}


def imported(cli_env: CliEnv, *args: str) -> set[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEFTREG_")}
    env.update(cli_env.env)
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "peftreg.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", done.stderr, re.M))


def test_push_and_pull_load_only_what_they_use(cli_env: CliEnv, tmp_path: Path) -> None:
    source = tmp_path / "adapter.bin"
    source.write_bytes(os.urandom(100_000))

    pushed = imported(cli_env, "push", str(source), "acme/startup:v1", "-q")
    pulled = imported(cli_env, "pull", "acme/startup:v1", "-o", str(tmp_path / "out"), "-q")

    assert {"httpx", "peftreg.transfer.push"} <= pushed  # the parse sees imports
    assert "peftreg.file_lock" in pulled  # a pull locks its blobs
    assert "peftreg.transfer.pull" not in pushed
    assert pushed.isdisjoint(NEVER_FOR_TRANSFERS)
    assert pulled.isdisjoint(NEVER_FOR_TRANSFERS)
    assert (tmp_path / "out" / "adapter.bin").read_bytes() == source.read_bytes()


def _lora(directory: Path, **extra: object) -> Path:
    """A rank-4 PEFT LoRA of one module, made without torch."""
    directory.mkdir()
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], **extra}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file(
        {
            f"{prefix}.lora_A.weight": np.ones((4, 16), np.float32),
            f"{prefix}.lora_B.weight": np.ones((16, 4), np.float32),
        },
        str(directory / "adapter_model.safetensors"),
    )
    return directory


def test_an_adapter_push_types_it_without_loading_the_models(
    cli_env: CliEnv, tmp_path: Path
) -> None:
    lora = _lora(tmp_path / "lora")

    pushed = imported(cli_env, "push", str(lora), "acme/startup-lora:v1", "-q")

    assert "peftreg.adapters.peft_import" in pushed
    assert pushed.isdisjoint(NEVER_FOR_TRANSFERS)
    url = cli_env.env["PEFTREG_URL"]
    version = httpx.get(f"{url}/api/v1/repositories/acme/startup-lora/versions/v1").json()
    assert (version["adapter"]["kind"], version["adapter"]["rank"]) == ("lora", 4)


def test_a_base_name_that_is_not_a_string_is_refused_before_any_upload(
    cli_env: CliEnv, tmp_path: Path
) -> None:
    lora = _lora(tmp_path / "lora", base_model_name_or_path=7)

    refused = cli_env.subprocess("push", str(lora), "acme/startup-bad:v1")

    assert refused.returncode == 1
    assert refused.stderr.startswith("peftreg: ")
    assert "base_model_name_or_path 7 is not a string" in refused.stderr
    assert refused.stderr.count("\n") == 1
    catalog = httpx.get(f"{cli_env.env['PEFTREG_URL']}/v2/_catalog").json()
    assert "acme/startup-bad" not in catalog["repositories"]


def test_version_loads_no_client(cli_env: CliEnv) -> None:
    loaded = imported(cli_env, "--version")
    assert loaded.isdisjoint({"httpx", "pydantic", "peftreg.sdk.client"})
