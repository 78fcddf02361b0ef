"""The documentation site: ``mkdocs build --strict`` passes offline, and the built pages hold what they promise.

The build runs into the test's own folder with warnings as errors (a broken link, a missing nav page, an
unresolvable API reference or docstring cross-reference fails it). Then: every nav page was built, the API
page documents the public names, each method card shows its example picture (and the picture exists), the
tutorials were rendered from the notebooks, no page loads anything from the network, and the README links
the pages it lists.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

pytestmark = pytest.mark.slow


def _nav() -> list[str]:
    text = (ROOT / "mkdocs.yml").read_text("utf-8")
    nav_block = text[text.index("\nnav:") :]
    return re.findall(r":\s*([\w./-]+\.md)\s*$", nav_block, flags=re.MULTILINE)


def _shared_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A folder every xdist worker of this session sees (the session's base folder), or a fresh one."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return tmp_path_factory.getbasetemp().parent / name
    return tmp_path_factory.mktemp(name)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site built once per test session, even when the module's tests are spread over xdist workers."""
    from filelock import FileLock

    out = _shared_dir(tmp_path_factory, "docs-site")
    with FileLock(f"{out}.lock"):
        if not (out / "index.html").is_file():
            _build(out)
    return out


def _build(out: Path) -> None:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", OMP_NUM_THREADS="1")
    env.pop("http_proxy", None)
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"


def test_every_nav_page_is_built(site: Path) -> None:
    pages = _nav()
    assert len(pages) >= 18, pages
    for page in pages:
        assert (site / page.replace(".md", ".html")).is_file(), page
    sources = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    generated = {p for p in pages if p.startswith("tutorials/")}
    assert set(pages) - generated <= sources
    assert sources - set(pages) == set(), f"pages missing from the nav: {sorted(sources - set(pages))}"


def test_no_page_loads_anything_from_the_network(site: Path) -> None:
    external = re.compile(r"<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)=\"(?:https?:)?//", re.IGNORECASE)
    for page in site.rglob("*.html"):
        hit = external.search(page.read_text("utf-8"))
        assert hit is None, f"{page.relative_to(site)} loads {hit.group(0)}"
    assert not list(site.rglob("*fonts.googleapis*"))


def test_api_reference_documents_the_public_names(site: Path) -> None:
    page = (site / "api.html").read_text("utf-8")
    import cnnlens

    documented = {n for n in cnnlens.__all__ if n != "__version__"}
    missing = [n for n in documented if not re.search(rf'id="cnnlens\.[\w.]*\.{n}"', page)]
    assert not missing, f"public names without an API entry: {missing}"
    # docstring examples are rendered as code, not as nested Markdown quotes
    assert "&gt;&gt;&gt;" in page and "<blockquote>\n<blockquote>" not in page
    assert 'id="cnnlens.explanation.Explanation.show"' in page


def test_method_cards_show_an_example_picture_per_method(site: Path) -> None:
    from cnnlens.methods import method_ids

    page = (site / "methods.html").read_text("utf-8")
    for mid in method_ids():
        assert (DOCS / "images" / "methods" / f"{mid}.png").is_file(), f"run scripts/method_cards.py --only {mid}"
        assert (site / "images" / "methods" / f"{mid}.png").is_file()
        assert f'src="images/methods/{mid}.png"' in page
    assert page.count("Display rule") == len(method_ids())


def test_tutorials_are_rendered_from_the_notebooks(site: Path) -> None:
    import html

    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        page = (site / "tutorials" / f"{notebook.stem}.html").read_text("utf-8")
        text = html.unescape(re.sub(r"<[^>]+>", "", page))
        cells = json.loads(notebook.read_text("utf-8"))["cells"]
        code = [line.strip() for c in cells if c["cell_type"] == "code" for line in "".join(c["source"]).splitlines()]
        missing = [line for line in code if line and line not in text]
        assert not missing, f"{notebook.name}: code lines not on the page: {missing[:5]}"
        title = "".join(cells[0]["source"]).splitlines()[0].lstrip("# ")
        assert title in text


def test_readme_links_the_pages_and_keeps_the_quick_start() -> None:
    readme = (ROOT / "README.md").read_text("utf-8")
    assert "make demo" in readme and "make test" in readme
    links = set(re.findall(r"\]\((docs/[\w./-]+\.md)(?:#[\w-]+)?\)", readme))
    for link in links:
        assert (ROOT / link).is_file(), link
    for page in ("getting-started", "guide/explain", "guide/study", "guide/runs", "guide/jupyter", "methods", "api"):
        assert f"docs/{page}.md" in links, page
