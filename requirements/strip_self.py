"""Drop entries from a pip-compile lock: the project itself, and any package named.

The role extras refer to each other (`peftreg[server,hotswap]`), so pip-compile
lists the project itself as `peftreg @ file:///...`: a local path that has no
hash. The Makefile installs the project separately, editable, without deps.

`--drop torch` removes torch from the image's lock (requirements/server.txt):
it is resolved against the CPU build so that no CUDA libraries are pinned, and
the Dockerfile installs the build for its variant (cpu or cuda) before the lock.
"""

import argparse
import re
from pathlib import Path

SELF = re.compile(
    r"(?:# WARNING: pip install will require.*\n(?:#.*\n)*)?peftreg @ file:.*\n(?:    #.*\n)*"
)


def entry(name: str) -> re.Pattern[str]:
    """A pinned entry with its hash and `# via` lines."""
    return re.compile(rf"^{re.escape(name)}==\S+ \\\n(?:    .*\n)*", re.MULTILINE)


parser = argparse.ArgumentParser()
parser.add_argument("locks", nargs="+", type=Path)
parser.add_argument("--drop", action="append", default=[])
arguments = parser.parse_args()
for path in arguments.locks:
    text = SELF.sub("", path.read_text())
    for name in arguments.drop:
        text = entry(name).sub("", text)
    path.write_text(text)
