"""Drop the project's own entry from a pip-compile lock.

The role extras refer to each other (`peftreg[server,hotswap]`), so pip-compile
lists the project itself as `peftreg @ file:///...`: a local path that has no
hash. The Makefile installs the project separately, editable, without deps.
"""

import re
import sys
from pathlib import Path

ENTRY = re.compile(
    r"(?:# WARNING: pip install will require.*\n(?:#.*\n)*)?peftreg @ file:.*\n(?:    #.*\n)*"
)

for name in sys.argv[1:]:
    path = Path(name)
    path.write_text(ENTRY.sub("", path.read_text()))
