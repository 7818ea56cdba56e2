"""Print the oldest Lightning release pyproject.toml allows (the version of its ``lightning>=`` bound)."""

import re
import sys

with open(sys.argv[1], encoding="utf-8") as file:
    found = re.findall(r'^\s*"lightning\s*>=\s*([\w.]+)', file.read(), flags=re.MULTILINE)
if len(found) != 1:
    raise SystemExit(f"pyproject.toml must give lightning one lower bound `lightning>=X`, found {found}")
print(found[0])
