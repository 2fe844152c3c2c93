"""The CLI's root group: every error a command raises becomes one line and an exit code."""

from __future__ import annotations

from typing import Any

import click

from peftreg.cli.extras import missing_extra_message
from peftreg.sdk.errors import PeftregError

EXIT_ERROR = 1  # every refusal, an invalid reference included (as docker and oras)
EXIT_USAGE = 2  # click's usage errors only: unknown option, missing argument


def fail(message: str, code: int = EXIT_ERROR) -> click.exceptions.Exit:
    click.echo(f"peftreg: {message}", err=True)
    return click.exceptions.Exit(code)


class PeftregGroup(click.Group):
    """Turns the SDK's errors into one line on stderr and a non-zero exit."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PeftregError as exc:
            raise fail(str(exc)) from None
        except OSError as exc:
            raise fail(str(exc)) from None
        except ModuleNotFoundError as exc:
            message = missing_extra_message(ctx.invoked_subcommand, exc.name)
            if message is None:
                raise
            raise fail(message) from None
        except KeyboardInterrupt:
            raise fail("interrupted", 130) from None
