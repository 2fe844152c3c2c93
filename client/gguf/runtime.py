"""llama.cpp itself, run on GGUF files through node-llama-cpp's prebuilt CPU binaries.

peftreg does not link llama.cpp: `LlamaCppRuntime` runs `llamacpp_runner.mjs`
(shipped with the package) with Node.js, against a `node_modules` folder that
holds `node-llama-cpp` and its prebuilt binaries, installed from npm
(`npm ci --prefix tests/llamacpp` installs the one the tests use). Nothing is
downloaded or compiled at run time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftreg.sdk.errors import InvalidRequest

RUNNER = Path(__file__).with_name("llamacpp_runner.mjs")
MODULES_VARIABLE = "PEFTREG_LLAMACPP_MODULES"


class LlamaCppError(InvalidRequest):
    """llama.cpp is not installed here, or refused or failed on a file."""


@dataclass(frozen=True)
class LoraFile:
    path: Path
    scale: float = 1.0


@dataclass(frozen=True)
class GgufRun:
    """A GGUF file (with LoRA files applied) and the tasks to run on it."""

    model: Path
    tasks: list[dict[str, Any]]
    lora: list[LoraFile] = field(default_factory=list)
    context: int = 256


@dataclass(frozen=True)
class LlamaCppRuntime:
    modules: Path  # a node_modules folder holding node-llama-cpp
    node: str = "node"

    @classmethod
    def locate(cls, modules: Path | None = None) -> LlamaCppRuntime:
        """The runtime in `modules`, else in $PEFTREG_LLAMACPP_MODULES (read now)."""
        found = modules or (
            Path(os.environ[MODULES_VARIABLE]) if os.environ.get(MODULES_VARIABLE) else None
        )
        node = shutil.which("node")
        if found is None or node is None:
            raise LlamaCppError(
                "llama.cpp runs here through Node.js and node-llama-cpp: install Node.js and "
                "`npm install node-llama-cpp`, then pass --llamacpp-modules DIR (its "
                f"node_modules folder) or set {MODULES_VARIABLE}"
            )
        if not (found / "node-llama-cpp" / "package.json").is_file():
            raise LlamaCppError(f"{found} holds no node-llama-cpp package")
        return cls(found, node)

    def run(
        self,
        model: Path,
        tasks: list[dict[str, Any]],
        *,
        lora: list[LoraFile] | None = None,
        context: int = 256,
        threads: int = 1,
        timeout: float = 600,
    ) -> list[dict[str, Any]]:
        """The answers to `tasks` (see llamacpp_runner.mjs) on the GGUF file `model`."""
        runs = [GgufRun(model, tasks, lora or [], context)]
        return self.run_many(runs, threads=threads, timeout=timeout)[0]

    def run_many(
        self, runs: list[GgufRun], *, threads: int = 1, timeout: float = 600
    ) -> list[list[dict[str, Any]]]:
        """Each run's answers, all in one llama.cpp process evaluating on `threads` threads
        (one by default: on a shared or small machine llama.cpp's spinning threads cost
        far more than they give for small models)."""
        request = {
            "threads": threads,
            "runs": [
                {
                    "model": str(run.model),
                    "lora": [{"path": str(item.path), "scale": item.scale} for item in run.lora],
                    "context": run.context,
                    "tasks": run.tasks,
                }
                for run in runs
            ],
        }
        done = subprocess.run(
            [self.node, str(RUNNER), str(self.modules)],
            input=json.dumps(request),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
            models = ", ".join(str(run.model) for run in runs)
            raise LlamaCppError(f"llama.cpp failed on {models}: {' / '.join(tail)}")
        answers: list[list[dict[str, Any]]] = json.loads(done.stdout)["runs"]
        return answers


__all__ = ["MODULES_VARIABLE", "GgufRun", "LlamaCppError", "LlamaCppRuntime", "LoraFile"]
