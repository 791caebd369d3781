"""The manual stays true: README.md is short and points into docs/, docs/cli.md is `featx --help`
word for word, docs/python-api.md shows each function's signature as the code has it, every option
of every command has a sentence in a hand-written page, the module map in docs/architecture.md
lists every module, and every relative link resolves.

`python tests/test_docs.py --write` (or `make docs`) regenerates docs/cli.md and the signature
blocks of docs/python-api.md (the prose around them is written by hand)."""

from __future__ import annotations

import importlib.util
import inspect
import re
import sys
from pathlib import Path

import click
import pytest

import featx
from featx.cli import cli

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "featx"
DOCS = ROOT / "docs"
README = ROOT / "README.md"
CLI_DOC = DOCS / "cli.md"
COMMANDS = sorted(cli.commands)
MAX_README_LINES = 300
WIDTH = 100  # the CLI reference is rendered at this width, whatever the terminal

CLI_HEADER = """\
# CLI reference

<!-- Generated from `featx --help` by `make docs` (python tests/test_docs.py --write): do not
edit by hand; tests/test_docs.py fails when this file is out of date. -->

Every command's `--help`, as it prints. What the commands do, option by option, is in
[commands.md](commands.md); a walk through them is in [tutorial.md](tutorial.md).
"""


def render_help(command: click.Command, name: str) -> str:
    """`NAME --help` as the CLI prints it (the group's context settings, -h included), at a
    fixed width, so the output does not depend on the terminal."""
    width = {"terminal_width": WIDTH, "max_content_width": WIDTH}
    group = cli.make_context("featx", [], resilient_parsing=True, **width)
    if command is cli:
        return cli.get_help(group).rstrip()
    ctx = command.make_context(name.split()[-1], [], parent=group, resilient_parsing=True)
    ctx.info_name = name
    return command.get_help(ctx).rstrip()


def render_cli_reference() -> str:
    """docs/cli.md: `featx --help`, then a `## featx NAME` section per command."""
    sections = [("featx", cli)] + [(f"featx {name}", cli.commands[name]) for name in COMMANDS]
    body = [f"## {title}\n\n```text\n{render_help(cmd, title)}\n```\n" for title, cmd in sections]
    return CLI_HEADER + "\n" + "\n".join(body)


def hand_written_pages() -> dict[str, str]:
    """Every docs page a person wrote (all but the generated cli.md), and README.md."""
    pages = {p.name: p.read_text() for p in sorted(DOCS.glob("*.md")) if p != CLI_DOC}
    return {"README.md": README.read_text(), **pages}


def section(text: str, heading: str) -> str:
    """The text under a heading line (`## Name`), up to the next heading of that level or above."""
    level = len(heading) - len(heading.lstrip("#"))
    match = re.search(rf"^{re.escape(heading)}\s*\n(.*?)(?=^#{{1,{level}}} |\Z)", text, re.S | re.M)
    assert match, f"no '{heading}' heading"
    return match.group(1)


# --- README.md --------------------------------------------------------------------------------


def test_readme_is_short():
    lines = README.read_text().count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move reference text to docs/"


def test_readme_links_every_docs_page():
    text = README.read_text()
    missing = [p.name for p in sorted(DOCS.glob("*.md")) if f"(docs/{p.name}" not in text]
    assert not missing, f"README.md does not link these docs pages: {missing}"


def test_the_docs_index_links_every_page():
    index = (DOCS / "README.md").read_text()
    pages = [p.name for p in sorted(DOCS.glob("*.md")) if p.name != "README.md"]
    missing = [name for name in pages if f"({name}" not in index]
    assert not missing, f"docs/README.md does not link: {missing}"


# --- links ------------------------------------------------------------------------------------

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # no headings inside code
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} (.+?)\s*$", text, re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def relative_links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


MARKDOWN = [README, *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("page", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in relative_links(page):
        file, _, anchor = target.partition("#")
        resolved = (page.parent / file).resolve() if file else page
        if not resolved.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{page.relative_to(ROOT)} has broken links: {broken}"


def test_the_link_checker_reads_links_and_headings(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# Top `featx extract DATA_DIR`\n[a](page.md#top-featx-extract-data_dir) [b](x.md)"
    )
    assert relative_links(page) == ["page.md#top-featx-extract-data_dir", "x.md"]
    assert anchors(page) == {"top-featx-extract-data_dir"}


# --- the CLI reference and the commands ---------------------------------------------------------


def test_the_cli_has_the_documented_stages():
    assert {"extract", "fit-head", "predict", "export", "audit", "info"} <= set(COMMANDS)


def test_cli_reference_is_up_to_date():
    expected = render_cli_reference()
    actual = CLI_DOC.read_text() if CLI_DOC.exists() else ""
    assert actual == expected, "docs/cli.md is out of date: run make docs"


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_help_and_a_docs_section(name):
    command = cli.commands[name]
    assert command.help and len(command.help.strip()) > 20, f"featx {name} has no help text"
    assert f"\n## featx {name}\n" in CLI_DOC.read_text(), f"docs/cli.md has no featx {name}"
    commands_page = (DOCS / "commands.md").read_text()
    assert re.search(rf"^## `featx {name}\b", commands_page, re.M), (
        f"docs/commands.md has no '## `featx {name} ...`' section"
    )


def options(command: click.Command) -> list[str]:
    """The longest flag of each option (`--flip/--no-flip` -> `--flip`)."""
    return [max(p.opts, key=len) for p in command.params if isinstance(p, click.Option)]


@pytest.mark.parametrize("name", ["featx", *COMMANDS])
def test_every_option_has_a_sentence_in_a_hand_written_page(name):
    # docs/cli.md lists every option by construction; a person must also have written about it.
    command = cli if name == "featx" else cli.commands[name]
    pages = hand_written_pages()
    cli_doc = CLI_DOC.read_text()
    for flag in options(command):
        if flag == "--help":
            continue
        assert flag in cli_doc, f"docs/cli.md does not show featx {name} {flag}: run make docs"
        assert any(f"`{flag}" in text for text in pages.values()), (
            f"no hand-written docs page mentions `{flag}` (featx {name})"
        )


def test_the_option_check_sees_a_missing_option():
    @click.command()
    @click.option("--flip/--no-flip", default=False)
    @click.option("-n", "--never-documented-anywhere", type=int)
    def fake(flip, never_documented_anywhere):
        """A command with an option no page mentions."""

    assert options(fake) == ["--flip", "--never-documented-anywhere"]
    assert not any("`--never-documented-anywhere" in t for t in hand_written_pages().values())


# --- the Python API ---------------------------------------------------------------------------


def _public_api() -> dict[str, object]:
    """Every function `featx.NAME` of featx.__all__: the commands (the function NAME of
    featx/commands/NAME.py) and featx.load."""
    values = {name: getattr(featx, name) for name in featx.__all__}
    return {name: f for name, f in values.items() if inspect.isfunction(f)}


# Loaded when this file is collected, before any fixture runs: a default read from featx.config
# when its module is imported (`engine=config.ENGINE`) is then the real one, not a test's patch.
PUBLIC_API = _public_api()


def public_api() -> dict[str, object]:
    return PUBLIC_API


def render_signature(name: str, function) -> str:
    """`featx.NAME(...) -> R` as `help()` shows it, one parameter a line when long, with the
    defaults' values (not the config names the source uses)."""
    parts, keyword_only = [], False
    for p in inspect.signature(function).parameters.values():
        if p.kind == p.KEYWORD_ONLY and not keyword_only:
            parts.append("*")
            keyword_only = True
        text = p.name if p.kind != p.VAR_KEYWORD else f"**{p.name}"
        if p.annotation is not p.empty:
            text += f": {p.annotation if isinstance(p.annotation, str) else p.annotation.__name__}"
        if p.default is not p.empty:
            value = f'"{p.default}"' if isinstance(p.default, str) else repr(p.default)
            text += f" = {value}" if p.annotation is not p.empty else f"={value}"
        parts.append(text)
    returns = inspect.signature(function).return_annotation
    tail = (
        "" if returns is inspect.Signature.empty else f" -> {getattr(returns, '__name__', returns)}"
    )
    one_line = f"featx.{name}({', '.join(parts)}){tail}"
    if len(one_line) <= WIDTH:
        return one_line
    return f"featx.{name}(\n" + "".join(f"    {x},\n" for x in parts) + f"){tail}"


def signature_block(name: str) -> re.Pattern:
    """The ```python block right under the `### `featx.NAME`` heading of docs/python-api.md."""
    return re.compile(rf"(^### `featx\.{name}`\n\n```python\n)(.*?)(\n```)", re.S | re.M)


def sync_python_api(text: str) -> str:
    """docs/python-api.md with every signature block rewritten from the code."""
    for name, function in public_api().items():
        signature = render_signature(name, function)
        text = signature_block(name).sub(lambda m, s=signature: m[1] + s + m[3], text)
    return text


def test_python_api_documents_every_function():
    page = (DOCS / "python-api.md").read_text()
    functions = public_api()
    commands = {c.replace("-", "_") for c in COMMANDS}
    assert commands <= set(functions), f"no featx.NAME for: {commands - set(functions)}"
    missing = [name for name in functions if not signature_block(name).search(page)]
    assert not missing, (
        f"docs/python-api.md needs a '### `featx.NAME`' heading and a ```python block for {missing}"
    )
    for name in set(featx.__all__) - set(functions):  # FeatxError, FeatxWarning, __version__
        assert f"featx.{name}" in page, f"docs/python-api.md does not mention featx.{name}"


def test_python_api_signatures_are_up_to_date():
    page = (DOCS / "python-api.md").read_text()
    assert sync_python_api(page) == page, "docs/python-api.md is out of date: run make docs"


def test_a_signature_renders_as_help_shows_it():
    def fit(cache_path: str, head: str = "logreg", *, seed: int = 0, log=None) -> dict:
        """A stand-in."""

    assert render_signature("fit", fit) == (
        'featx.fit(cache_path: str, head: str = "logreg", *, seed: int = 0, log=None) -> dict'
    )


# --- docs/architecture.md ---------------------------------------------------------------------


def architecture() -> str:
    return (DOCS / "architecture.md").read_text()


def module_rows() -> list[tuple[str, str]]:
    """The module map: one row `| `featx/PATH.py` | role |` per module."""
    text = section(architecture(), "## The module map")
    return re.findall(r"^\|\s*`(featx/[\w/]+\.py)`\s*\|\s*(.*?)\s*\|\s*$", text, re.M)


def test_architecture_table_lists_every_module():
    # Every featx/**/*.py has a row, package __init__.py files included. Adding, renaming or
    # removing a module without its row fails here, naming the rows to add or remove.
    rows = module_rows()
    documented = [path for path, _ in rows]
    actual = sorted(str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py"))
    missing = sorted(set(actual) - set(documented))
    stale = sorted(set(documented) - set(actual))
    assert not missing, f"add docs/architecture.md rows: {missing}"
    assert not stale, f"docs/architecture.md lists modules that are gone: {stale}"
    assert len(documented) == len(set(documented)), "a module has two rows"
    short = [path for path, role in rows if len(role) <= 15]
    assert not short, f"say what these modules do: {short}"


def packages() -> list[str]:
    return sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))


def test_architecture_shows_the_data_flow_through_modules_that_exist():
    text = section(architecture(), "## The data flow")
    diagram = re.search(r"```text\n(.*?)```", text, re.S)
    assert diagram, "the data-flow section has no ```text diagram"
    named = re.findall(rf"\b({'|'.join(packages())})\.(\w+)\b", diagram.group(1))
    assert named, "the diagram names no featx modules"
    gone = sorted({f"{p}.{m}" for p, m in named if not (PACKAGE / p / f"{m}.py").exists()})
    assert not gone, f"the diagram names modules that do not exist: {gone}"
    shown = {p for p, _ in named}
    assert shown == set(packages()), f"packages not in the diagram: {set(packages()) - shown}"
    stages = {f"commands.{c.replace('-', '_')}" for c in COMMANDS}
    absent = sorted(s for s in stages if not re.search(rf"\b{re.escape(s)}\b", diagram.group(1)))
    assert not absent, f"commands not in the diagram: {absent}"


def load_architecture_rules():
    spec = importlib.util.spec_from_file_location("arch_rules", ROOT / "tests/test_architecture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_architecture_states_the_rules_the_tests_keep():
    rules = load_architecture_rules()
    text = section(architecture(), "## The rules")
    assert f"{rules.MAX_FUNCTION_LINES} lines" in text
    assert f"{rules.MAX_PRIVATE_PARAMETERS} parameters" in text
    assert f"{rules.MAX_TOP_LEVEL} " in text
    # The layer table: | `part` | `a`, `b` | (or "nothing"), one row per part of MAY_IMPORT.
    rows = re.findall(r"^\|\s*`([\w]+)`\s*\|\s*(.*?)\s*\|", text, re.M)
    table = {part: set(re.findall(r"`(\w+)`", deps)) for part, deps in rows}
    assert table == rules.MAY_IMPORT, (
        "docs/architecture.md's layer table differs from MAY_IMPORT in tests/test_architecture.py"
    )


def main(argv: list[str]) -> int:
    """`--write`: regenerate docs/cli.md and the signature blocks of docs/python-api.md."""
    if argv != ["--write"]:
        print("usage: python tests/test_docs.py --write", file=sys.stderr)
        return 2
    api = DOCS / "python-api.md"
    for path, text in ((CLI_DOC, render_cli_reference()), (api, sync_python_api(api.read_text()))):
        changed = not path.exists() or path.read_text() != text
        path.write_text(text)
        print(f"{'wrote' if changed else 'unchanged'}: {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
