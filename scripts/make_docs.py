"""Write the flag tables of README.md and docs/*.md from the settings declarations.

Between `<!-- flags:COMMAND -->` and `<!-- /flags:COMMAND -->` a page gets a table of
COMMAND's settings options, made from the same fields (config.py) and the same Use(...)
lists (cli.py) the command line is built from (flags.py), so the docs cannot disagree
with `--help`. tests/test_docs.py runs this in check mode.

    python scripts/make_docs.py          # rewrite the tables
    python scripts/make_docs.py --check  # exit 1 and name the stale pages
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from grpoctl import cli, flags

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
REGION = re.compile(r"(<!-- flags:(\w+) -->\n)(.*?)(<!-- /flags:\2 -->)", re.S)


def table(command: str) -> str:
    """COMMAND's settings options as a markdown table: flag, default, meaning."""
    callback = next(c.callback for c in cli.app.registered_commands
                    if (c.name or c.callback.__name__) == command)
    rows = ["| flag | default | meaning |", "| --- | --- | --- |"]
    for use in callback.uses.values():
        for f in use.fields():
            default = use.defaults.get(f.name, f.default)
            if f.default_factory is not flags.dataclasses.MISSING:
                default = ", ".join(f.default_factory())
            shown = "" if default is None or f.metadata.get("invert") else f"`{default}`"
            names = ", ".join(f"`{n}`" for n in flags.names_of(f, use))
            text = use.help(f).replace("|", "\\|")
            rows.append(f"| {names} | {shown} | {text} |")
    return "\n".join(rows) + "\n"


def render(text: str) -> str:
    return REGION.sub(lambda m: m.group(1) + table(m.group(2)) + m.group(4), text)


def main(check: bool) -> int:
    stale = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        new = render(text)
        if new != text:
            stale.append(page)
            if not check:
                page.write_text(new, encoding="utf-8")
    for page in stale:
        print(f"{page.relative_to(ROOT)}: {'stale' if check else 'rewritten'}")
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main("--check" in sys.argv[1:]))
