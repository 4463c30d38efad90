"""Render the README's settings table from ``server.settings.Settings`` (one source of truth).

Usage: ``python scripts/settings_table.py [--write]`` prints the table, or rewrites it in
README.md between the ``settings-table`` markers. ``tests/test_readme.py`` fails when the
README's copy is stale.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server.settings import Settings  # noqa: E402

BEGIN = "<!-- settings-table:begin"
END = "<!-- settings-table:end -->"


def _default(value: object) -> str:
    if value is None:
        return "unset"
    return f"`{value}`"


def table() -> str:
    prefix = Settings.model_config.get("env_prefix", "")
    lines = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        doc = " ".join((field.description or "").split()).replace("|", "\\|")
        env = f"`{prefix}{name.upper()}`"
        lines.append(f"| {env} | {_default(field.default)} | {doc} |")
    return "\n".join(lines)


def render_readme(text: str) -> str:
    pattern = re.compile(re.escape(BEGIN) + r"[^\n]*\n.*?" + re.escape(END), re.S)
    match = pattern.search(text)
    if match is None:
        raise SystemExit("README.md has no settings-table markers")
    head = match.group(0).split("\n", 1)[0]
    return text[: match.start()] + f"{head}\n{table()}\n{END}" + text[match.end() :]


def main() -> int:
    readme = ROOT / "README.md"
    if "--write" in sys.argv[1:]:
        readme.write_text(render_readme(readme.read_text(encoding="utf-8")), encoding="utf-8")
    else:
        print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
