"""Entry point of the `peftreg` command.

Subcommands are imported when they are invoked (or listed by --help), so
`peftreg --version` and a push load no more than they use.
"""

from __future__ import annotations

import gc
import importlib
import os
import sys
from typing import Any

# `import httpx` also imports httpx's own command-line module (with rich and
# pygments when they are installed: a third of a push's start-up) unless that
# import fails. peftreg never runs it: a None entry makes the import fail fast.
if "httpx" not in sys.modules:
    sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]

import click

from peftreg.cli.extras import missing_extra_message
from peftreg.cli.group import PeftregGroup, fail

# Command name -> "module:attribute" of its click command.
COMMANDS: dict[str, str] = {
    "serve": "peftreg.cli.server:serve",
    "db": "peftreg.cli.server:db",
    "worker": "peftreg.cli.worker:worker",
    "gc": "peftreg.cli.maintenance:gc",
    "fsck": "peftreg.cli.maintenance:fsck",
    "login": "peftreg.cli.auth:login",
    "logout": "peftreg.cli.auth:logout",
    "push": "peftreg.cli.transfer:push",
    "pull": "peftreg.cli.transfer:pull",
    "ls": "peftreg.cli.catalog:list_repositories",
    "show": "peftreg.cli.catalog:show",
    "diff": "peftreg.cli.catalog:diff",
    "base": "peftreg.cli.base:base",
    "tag": "peftreg.cli.transfer:tag",
    "history": "peftreg.cli.catalog:history",
    "rm": "peftreg.cli.catalog:rm",
    "token": "peftreg.cli.tokens:token",
    "cache": "peftreg.cli.cache:cache",
    "fingerprint": "peftreg.cli.fingerprint:fingerprint",
    "nola": "peftreg.cli.nola:nola",
    "export": "peftreg.cli.jobs:export",
    "jobs": "peftreg.cli.jobs:jobs",
    "merge": "peftreg.cli.merge:merge",
    "eval": "peftreg.cli.quality:evaluate",
}


# The service's roles; every other command is a client of a registry.
SERVICE_COMMANDS = frozenset({"serve", "worker", "db", "gc", "fsck"})


def skip_pydantic_plugins(cmd_name: str) -> None:
    """Spare a client command pydantic's plugin discovery.

    The first pydantic model built looks for plugins in the entry points of
    every installed distribution: in an environment with torch and friends,
    tens of milliseconds of a 5 MB push. Client commands load no plugins;
    the service's roles keep them, as does anyone who sets the variable.
    """
    if cmd_name not in SERVICE_COMMANDS:
        os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")


class LazyGroup(PeftregGroup):
    """A group whose subcommands live in modules imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        skip_pydantic_plugins(cmd_name)
        module_name, attribute = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            message = missing_extra_message(cmd_name, exc.name)
            if message is None:
                raise
            raise fail(message) from None
        command: Any = getattr(module, attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"{target} is not a click command")
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="peftreg")
def cli() -> None:
    """peftreg: a registry for parameter-efficient fine-tuning adapters."""


def main() -> None:
    try:
        cli()
    finally:
        # The command is done. Python's exit would now run the garbage collector over
        # every object the imports made: about 20 ms, a tenth of a 5 MB pull. Frozen,
        # they are skipped; modules are still torn down and files closed.
        gc.freeze()


if __name__ == "__main__":
    main()
