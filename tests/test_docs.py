"""The README documents every command and every option (like sqlite-utils' docs checks)."""

import re
from pathlib import Path

import click
import pytest

from featx.cli import cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PACKAGE = ROOT / "featx"
COMMANDS = sorted(cli.commands)


def test_the_cli_has_the_documented_stages():
    assert {"extract", "info"} <= set(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_help_and_a_readme_section(name):
    command = cli.commands[name]
    assert command.help and len(command.help.strip()) > 20, f"featx {name} has no help text"
    assert f"### `featx {name}" in README, f"README has no section for featx {name}"


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_is_in_the_readme(name):
    for param in cli.commands[name].params:
        if isinstance(param, click.Option):
            longest = max(param.opts, key=len)
            assert f"`{longest}" in README, f"README does not mention featx {name} {longest}"


def architecture_section() -> str:
    """The README's "## Architecture" section, up to the next "## " heading."""
    match = re.search(r"^## Architecture\n(.*?)(?=^## )", README, re.S | re.M)
    assert match, "README has no '## Architecture' section"
    return match.group(1)


def test_architecture_table_lists_every_module():
    # One row per module: | `featx/NAME.py` | role |. Adding, renaming or removing a module
    # without its row fails here, naming the rows to add or remove.
    section = architecture_section()
    rows = re.findall(r"^\|\s*`featx/([\w.]+\.py)`\s*\|\s*(.*?)\s*\|\s*$", section, re.M)
    documented = [name for name, _ in rows]
    actual = sorted(p.name for p in PACKAGE.glob("*.py"))
    missing = sorted(set(actual) - set(documented))
    stale = sorted(set(documented) - set(actual))
    assert not missing, f"add README Architecture rows: {[f'featx/{m}' for m in missing]}"
    assert not stale, f"README Architecture lists modules that are gone: {stale}"
    assert len(documented) == len(set(documented)), "a module has two rows"
    assert all(len(role) > 15 for _, role in rows), "every module's row says what it does"


def test_architecture_shows_the_data_flow_through_modules_that_exist():
    section = architecture_section()
    assert "folder → images → engine → store → heads → report / export" in section
    diagram = re.search(r"```\n(.*?)```", section, re.S)
    assert diagram, "the Architecture section has no data-flow diagram"
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    for stage in ("images", "engines", "store", "fit_head", "heads", "report", "export"):
        assert re.search(rf"\b{stage}\b", diagram.group(1)), f"{stage} not in the diagram"
        assert stage in modules, f"the diagram names featx.{stage}, which does not exist"
