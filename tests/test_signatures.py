"""No function outside tests/ takes more than 8 parameters: a longer list is one concept passed in pieces
(STYLE.md: give it a name, as `Augmentation` and `AttackSettings` do)."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_PARAMETERS = 8  # every parameter but a method's self or cls, *args and **kwargs included


def sources():
    """The project's Python files outside tests/ (hidden folders and installed packages skipped)."""
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in ("tests", "__pycache__")
                         and not os.path.exists(os.path.join(folder, d, "pyvenv.cfg")))
        yield from (os.path.join(folder, f) for f in sorted(files) if f.endswith(".py"))


def parameters(node) -> list:
    a = node.args
    names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs] + [p.arg for p in (a.vararg, a.kwarg) if p]
    return [n for n in names if n not in ("self", "cls")]


def test_no_function_outside_tests_takes_more_than_8_parameters():
    long = []
    for path in sources():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        long += [f"{os.path.relpath(path, ROOT)}:{node.lineno} {node.name} ({len(parameters(node))})"
                 for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                 and len(parameters(node)) > MAX_PARAMETERS]
    assert not long, long
    assert any(path.endswith(os.path.join("utils", "gpu.py")) for path in sources())  # the walk finds the code
