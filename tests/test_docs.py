"""The README stays short and every relative link in it and in docs/ resolves, anchors included; the library never
imports a tool (utils/tools/)."""
import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
                               if f.endswith(".md"))
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(path) -> set:
    """GitHub's heading anchors of a markdown file: lower case, punctuation dropped, spaces to dashes."""
    with open(path, encoding="utf-8") as f:
        headings = [line.lstrip("#").strip() for line in f if line.startswith("#")]
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def links(page):
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        return [m.group(1) for m in LINK.finditer(f.read()) if "://" not in m.group(1)]


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_resolves(page):
    for link in links(page):
        target, _, anchor = link.partition("#")
        path = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), target)) if target else \
            os.path.join(ROOT, page)
        assert os.path.exists(path), f"{page}: {link} points at nothing"
        if anchor:
            assert anchor in anchors(path), f"{page}: {link}: no heading with that anchor"


def test_the_readme_is_short_and_links_every_doc():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    assert len(text.splitlines()) <= 200
    assert {p for p in PAGES if p.startswith("docs")} <= {os.path.normpath(link) for link in links("README.md")}


def library_files():
    """Every Python file a run may import: the entry scripts, args.py, models/ and utils/ outside utils/tools/."""
    top = [f for f in os.listdir(ROOT) if f.endswith(".py")]
    nested = [os.path.relpath(os.path.join(d, f), ROOT) for package in ("models", "utils")
              for d, _, files in os.walk(os.path.join(ROOT, package)) for f in files if f.endswith(".py")]
    return sorted(top + [f for f in nested if not f.startswith(os.path.join("utils", "tools"))])


def imports(path) -> list:
    """(module, names) of every import in `path`, relative imports resolved against its package."""
    package = os.path.dirname(path).replace(os.sep, ".")
    found = []
    for node in ast.walk(ast.parse(open(os.path.join(ROOT, path), encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package if node.level else ""
            found.append((".".join(p for p in (base, node.module) if p), [a.name for a in node.names]))
    return found


def is_ours(module) -> bool:
    return module.split(".")[0] in ("utils", "models")


def exists(module) -> bool:
    path = os.path.join(ROOT, *module.split("."))
    return os.path.exists(path + ".py") or os.path.exists(os.path.join(path, "__init__.py"))


def test_the_library_never_imports_a_tool():
    importers = [f for f in library_files() for module, names in imports(f)
                 if any(m == "utils.tools" or m.startswith("utils.tools.") for m in [module] +
                        [f"{module}.{n}" for n in names])]
    assert len(library_files()) > 40 and importers == []


def package_names(module) -> set:
    """What `from module import NAME` can take from a package of ours: its submodules and its __init__'s names."""
    folder = os.path.join(ROOT, *module.split("."))
    names = {f[:-3] if f.endswith(".py") else f for f in os.listdir(folder)}
    tree = ast.parse(open(os.path.join(folder, "__init__.py"), encoding="utf-8").read())
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets):
            names.update(ast.literal_eval(node.value))
    return names


@pytest.mark.slow
def test_every_import_of_our_modules_names_one_that_exists():
    tools = os.path.join("utils", "tools")
    every = library_files() + [os.path.join(folder, f) for folder in (tools, "tests")
                               for f in os.listdir(os.path.join(ROOT, folder)) if f.endswith(".py")]
    missing = [(f, m) for f in every for m, _ in imports(f) if is_ours(m) and not exists(m)]
    missing += [(f, f"{m}.{n}") for f in every for m, names in imports(f) if is_ours(m) and exists(m)
                and os.path.isdir(os.path.join(ROOT, *m.split("."))) for n in names if n not in package_names(m)]
    assert len(every) > 80 and missing == []
