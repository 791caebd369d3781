"""The architecture's rules (#13, #22), read from the code: short functions, private functions with
few parameters, folders that import only the layers below them, no import cycle (function-level
imports included), and command modules that never import each other."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "featx"
MAX_FUNCTION_LINES = 80
MAX_PRIVATE_PARAMETERS = 6
MAX_TOP_LEVEL = 16  # modules and packages directly in featx/

# Which part of featx may import which (a part: a top-level module, or a subpackage with all its
# modules). The flow: images -> backbone -> cache -> quality / heads -> reports -> artifacts ->
# commands -> cli. A part may also import itself (its own modules).
BASE = {"errors", "config", "files"}
MAY_IMPORT = {
    "errors": set(),
    "config": set(),
    "quiet": set(),
    "files": {"errors"},
    "images": BASE,
    "backbone": BASE | {"images"},
    "cache": BASE | {"images", "backbone"},
    "quality": BASE | {"cache"},
    "heads": BASE | {"quality"},
    "reports": BASE | {"images"},
    "artifacts": BASE | {"images", "backbone", "heads"},
    "options": BASE | {"images", "backbone", "heads"},
    "commands": BASE
    | {"images", "backbone", "cache", "quality", "heads", "reports", "artifacts", "options"},
    "cli": BASE | {"quiet", "options", "commands", "reports", "quality"},
    "__main__": {"cli"},
    "__init__": BASE | {"commands", "artifacts"},
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 2:
        parts = parts[:-1]
    return ".".join(parts)


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, ast.parse(path.read_text(), filename=str(path))


def functions():
    for path, tree in modules():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path, node


def parameters(node) -> list[str]:
    a = node.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
    return names + [x.arg for x in (a.vararg, a.kwarg) if x is not None]


def imported(tree, known: set[str]) -> set[str]:
    """The featx modules a module imports anywhere (function-level imports included):
    `from featx.a import b` names featx.a.b when that is a module, else featx.a."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("featx"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.add(full if full in known else node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("featx")}
    return out


def graph() -> dict[str, set[str]]:
    trees = {module_name(path): tree for path, tree in modules()}
    known = set(trees)
    return {name: imported(tree, known) - {name} for name, tree in trees.items()}


def part(module: str) -> str:
    """featx.cache.store -> cache; featx.cli -> cli; featx (the package itself) -> __init__."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "__init__"


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in list(edges):
        if v not in index:
            visit(v)
    return found


def test_no_function_is_over_80_lines():
    long = [
        f"{path.relative_to(PACKAGE)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path, node in functions()
        if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"split these into phases: {long}"


def test_no_private_function_takes_over_6_parameters():
    many = [
        f"{path.relative_to(PACKAGE)}:{node.name} ({len(parameters(node))} parameters)"
        for path, node in functions()
        if node.name.startswith("_") and not node.name.startswith("__")
        and len(parameters(node)) > MAX_PRIVATE_PARAMETERS
    ]  # fmt: skip
    assert not many, f"pass an options object or a dataclass instead: {many}"


def test_no_import_cycle():
    assert not cycles(graph()), "break these cycles by moving what both need below both"


def test_each_part_imports_only_the_layers_below_it():
    every_part = {part(m) for m in graph()}
    assert every_part <= set(MAY_IMPORT), (
        f"give these a row in MAY_IMPORT: {every_part - set(MAY_IMPORT)}"
    )
    crossing = sorted(
        f"{a} -> {b}"
        for a, deps in graph().items()
        for b in deps
        if part(b) != part(a) and part(b) not in MAY_IMPORT[part(a)]
    )
    assert not crossing, f"these import a layer above them (or a sideways one): {crossing}"


def test_no_command_module_imports_another():
    crossing = sorted(
        f"{a} -> {b}"
        for a, deps in graph().items()
        if a.startswith("featx.commands.")
        for b in deps
        if b.startswith("featx.commands.") and b != a
    )
    assert not crossing, f"move what they share to a lower layer: {crossing}"


def test_the_top_level_stays_small():
    top = [p for p in PACKAGE.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()]
    assert len(top) <= MAX_TOP_LEVEL, sorted(p.name for p in top)


def test_the_rules_see_a_violation():
    # The checks above must be able to fail: a long function, a wide private one, a cycle and an
    # import from a layer above.
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    tree = ast.parse(
        f"def long():\n{body}\ndef _wide(a, b, c, d, e, f, g):\n    from featx.cache import store\n"
    )
    nodes = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
    assert nodes[0].end_lineno - nodes[0].lineno + 1 > MAX_FUNCTION_LINES
    assert len(parameters(nodes[1])) > MAX_PRIVATE_PARAMETERS
    assert imported(tree, {"featx.cache.store"}) == {"featx.cache.store"}  # inside a function
    assert "cache" not in MAY_IMPORT["images"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
