"""The README stays short and every relative link in it and in docs/ resolves, anchors included."""
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
