"""Which extra of the `peftreg` distribution installs a module a command needs.

`pip install peftreg` is the CLI client and SDK. A command that needs more
(the service, a worker, tensor math) names the extra to install in one line
instead of ending in a traceback.
"""

from __future__ import annotations

HOTSWAP = "hotswap"
SERVER = "server"
WORKER = "worker"

# Top-level import name -> the extra that installs it.
EXTRA_OF_MODULE: dict[str, str] = {
    "torch": HOTSWAP,
    "safetensors": HOTSWAP,
    "numpy": HOTSWAP,
    "fastapi": SERVER,
    "starlette": SERVER,
    "uvicorn": SERVER,
    "sqlalchemy": SERVER,
    "alembic": SERVER,
    "boto3": SERVER,
    "botocore": SERVER,
    "psycopg": SERVER,
    "psycopg_binary": SERVER,
    "pydantic_settings": SERVER,
    "prometheus_client": SERVER,
    "pythonjsonlogger": SERVER,
    "transformers": WORKER,
    "gguf": WORKER,
}


def missing_extra_message(command: str | None, missing: str | None) -> str | None:
    """One line naming what to install for a missing module; None when no extra has it."""
    top = (missing or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(top)
    if extra is None:
        return None
    who = f"peftreg {command}" if command else "peftreg"
    install = f"pip install 'peftreg[{extra}]'"
    if top == "torch":
        return (
            f"{who} needs torch, which no extra installs: install the torch build for your "
            f"machine (pip install torch), then {install}"
        )
    return f"{who} needs {top}, from the '{extra}' extra: {install}"
