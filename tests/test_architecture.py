"""The architecture's rules (#13), read from the code: short functions, private functions with few
parameters, and stage modules that import only lower layers, never each other."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "featx"
STAGES = {"extract", "fit_head", "finetune", "predict", "export", "audit", "merge"}
MAX_FUNCTION_LINES = 80
MAX_PRIVATE_PARAMETERS = 6


def modules():
    for path in sorted(PACKAGE.glob("*.py")):
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


def featx_modules_imported(node) -> list[str]:
    if isinstance(node, ast.ImportFrom) and node.module == "featx":
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("featx."):
        return [node.module.split(".")[1]]
    if isinstance(node, ast.Import):
        return [a.name.split(".")[1] for a in node.names if a.name.startswith("featx.")]
    return []


def test_no_function_is_over_80_lines():
    long = [
        f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path, node in functions()
        if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"split these into phases: {long}"


def test_no_private_function_takes_over_6_parameters():
    many = [
        f"{path.name}:{node.name} ({len(parameters(node))} parameters)"
        for path, node in functions()
        if node.name.startswith("_") and not node.name.startswith("__")
        and len(parameters(node)) > MAX_PRIVATE_PARAMETERS
    ]  # fmt: skip
    assert not many, f"pass an options object or a dataclass instead: {many}"


def test_no_stage_module_imports_another():
    crossing = sorted(
        {
            f"{path.stem} -> {name}"
            for path, tree in modules()
            if path.stem in STAGES
            for node in ast.walk(tree)
            for name in featx_modules_imported(node)
            if name in STAGES and name != path.stem
        }
    )
    assert not crossing, f"move what they share to a lower layer: {crossing}"


def test_the_rules_see_a_violation(tmp_path):
    # The checks above must be able to fail: a long function, a wide private one, a stage import.
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    tree = ast.parse(f"def long():\n{body}\ndef _wide(a, b, c, d, e, f, g):\n    pass\n"
                     "from featx import predict\n")  # fmt: skip
    nodes = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
    assert nodes[0].end_lineno - nodes[0].lineno + 1 > MAX_FUNCTION_LINES
    assert len(parameters(nodes[1])) > MAX_PRIVATE_PARAMETERS
    imported = [m for n in ast.walk(tree) for m in featx_modules_imported(n)]
    assert imported == ["predict"]
