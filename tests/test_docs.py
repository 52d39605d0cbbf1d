"""The API reference (mkdocs.yml, docs/api/) covers every public room and every results page."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def nav_pages(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [page for item in node for page in nav_pages(item)]
    return [page for value in node.values() for page in nav_pages(value)]


def test_nav_lists_every_results_page_and_api_page():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    docs = ROOT / config["docs_dir"]
    pages = nav_pages(config["nav"])
    results = sorted(p.relative_to(docs).as_posix() for p in docs.glob("results/*/README.md"))
    assert results, "no docs/results/*/README.md found"
    assert [p for p in results if p not in pages] == []
    assert [p for p in pages if not (docs / p).is_file()] == []


def test_every_public_package_has_an_api_page():
    packages = sorted(p.parent.name for p in (ROOT / "tl_lightning").glob("*/__init__.py"))
    assert "callbacks" in packages
    for name in packages:
        page = ROOT / "docs" / "api" / ("run.md" if name == "run" else f"{name}.md")
        assert page.is_file(), f"{name}: no {page.relative_to(ROOT)}"
        assert f"::: tl_lightning.{name}" in page.read_text(), (
            f"{page.relative_to(ROOT)} renders no tl_lightning.{name}"
        )
