"""Where a merge may write: never over, around or inside its own inputs.

Writing a merged checkpoint replaces its output directory (with `--force` /
`replace=True`): the old one is renamed aside and deleted. An output that is
the base directory, an adapter's directory, or a directory containing either
would delete the inputs; one inside the base directory would add a model to
the base's files. Paths are compared resolved (symlinks followed), before
anything is read or written.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from peftreg.merge.errors import MergeError
from peftreg.merge.inputs import AdapterInput


def _refusal(output: Path, target: Path, what: str, directory: Path) -> str | None:
    if target == directory:
        return f"the output {output} is {what} itself; write elsewhere"
    if directory.is_relative_to(target):
        return (
            f"the output {output} contains {what} ({directory}); replacing it would delete "
            "it, so write elsewhere"
        )
    return None


def check_destination(output: Path, base_dir: Path, adapters: Sequence[AdapterInput]) -> None:
    """MergeError unless `output` is outside the base directory and is neither an input
    directory nor an ancestor of one."""
    target = Path(output).resolve()
    base = Path(base_dir).resolve()
    message = _refusal(output, target, "the base directory", base)
    if message is None and target.is_relative_to(base):
        message = f"the output {output} is inside the base directory {base}; write elsewhere"
    for adapter in adapters:
        if message is not None:
            break
        directory = adapter.tensors_path.parent.resolve()
        message = _refusal(output, target, f"the directory of adapter {adapter.name}", directory)
    if message is not None:
        raise MergeError(message)


__all__ = ["check_destination"]
