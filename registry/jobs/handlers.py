"""The job kinds a worker knows, by name."""

from __future__ import annotations

from peftreg.registry.jobs.export import EXPORT, run_export
from peftreg.registry.jobs.worker import Handler


def default_handlers() -> dict[str, Handler]:
    return {EXPORT: run_export}
