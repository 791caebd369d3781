"""The README documents every command and every option (like sqlite-utils' docs checks)."""

from pathlib import Path

import click
import pytest

from featx.cli import cli

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
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
