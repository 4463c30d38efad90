"""The README stays true: its test command is what CI runs, its settings table is current."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _settings_table_module() -> ModuleType:
    path = ROOT / "scripts/settings_table.py"
    spec = importlib.util.spec_from_file_location("settings_table", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_opens_with_the_two_commands() -> None:
    first_block = re.search(r"```sh\n(.*?)```", README, re.S)
    assert first_block is not None
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines()]
    assert commands == ["make serve", "make test"]


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci/run").read_text(encoding="utf-8")
    assert re.search(r"^make test$", ci, re.M)


def test_settings_table_is_current() -> None:
    module = _settings_table_module()
    assert module.render_readme(README) == README, (
        "README settings table is stale: run python scripts/settings_table.py --write"
    )


def test_every_linked_document_exists() -> None:
    for target in re.findall(r"\]\(([^)#\s]+)\)", README):
        if "://" not in target:
            assert (ROOT / target).exists(), target
