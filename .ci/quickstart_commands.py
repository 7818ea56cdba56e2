"""Print the shell commands of the README's Quick start block, one per line, as a user would type them.

The block is the first fenced code block after the "Quick start" heading; comment lines and a leading
``$`` prompt are dropped and backslash-continued lines are joined.
"""

import re
import sys


def quickstart_commands(readme_text: str) -> list[str]:
    heading = re.search(r"^#+\s*quick\s*-?start.*?$", readme_text, re.IGNORECASE | re.MULTILINE)
    if heading is None:
        raise SystemExit("README has no 'Quick start' heading")
    block = re.search(r"```[a-z]*\n(.*?)```", readme_text[heading.end() :], re.DOTALL)
    if block is None:
        raise SystemExit("README's Quick start has no fenced code block")
    commands, pending = [], ""
    for raw in block.group(1).splitlines():
        line = re.sub(r"^\$\s+", "", raw.strip())
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        commands.append(pending + line)
        pending = ""
    return commands


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as readme:
        print("\n".join(quickstart_commands(readme.read())))
