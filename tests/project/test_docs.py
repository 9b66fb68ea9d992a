"""The documentation site builds with ``mkdocs build --strict`` (every warning is an error), as CI runs it."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS_TOOLS = ("mkdocs-material", "mkdocstrings[python]")


def test_docs_tools_are_in_the_test_extra():
    tomllib = pytest.importorskip("tomllib")
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    names = {re.split(r"[<>=!~ ;]", req, maxsplit=1)[0] for req in extra}
    assert set(DOCS_TOOLS) <= names, f"CI installs .[test]: add {DOCS_TOOLS} to it"


def test_docs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    pytest.importorskip("mkdocstrings_handlers.python")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]

    api = (site / "api" / "callbacks" / "index.html").read_text()
    for name in ("WinogradPruning", "DEPrune", "load_pruned_checkpoint", "PruningCallback"):
        assert f'id="lightning_winoprune.{name}"' in api or f'id="lightning_winoprune.callbacks.{name}"' in api, name
    assert "Prune the Winograd-domain weights" in api  # the docstrings were rendered, not only the headings
    assert ":class:`" not in api  # reST roles became cross-references
    for page in ("quickstart", "pruning", "deprune", "recipes", "latency", "checkpoints", "benchmarks",
                 "api/winograd", "api/data", "api/importance", "api/recipes"):
        assert (site / page / "index.html").is_file(), page

    # every pattern picture the pages show was built into the site
    pictures = set()
    for page in ("pruning", "deprune"):
        pictures |= set(re.findall(r'src="\.\./(assets/[\w.-]+\.png)"', (site / page / "index.html").read_text()))
    assert len(pictures) >= 9, pictures
    assert all((site / p).is_file() for p in pictures)


#: Citations of material that lives outside the repository (a design page, paper seeds, a sibling checkout).
OUTSIDE = re.compile(r"\.\./shared|shared/design|\bseeds/|algorithms\.md|design page|\bsrc/lightning_winoprune")


def _project_texts() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "docs").rglob("*.py"))]
    for ext in ("*.py", "*.yaml", "*.md"):
        files += sorted((ROOT / "lightning_winoprune").rglob(ext))
    for ext in ("*.h", "*.cpp", "*.hpp", "*.txt"):
        files += sorted((ROOT / "csrc").rglob(ext))
    return files


def test_no_doc_or_comment_cites_a_path_outside_the_repository():
    hits = []
    for path in _project_texts():
        for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
    assert not hits, "state the definitions in docs/ instead of citing:\n" + "\n".join(hits)


def test_relative_links_of_the_readme_and_docs_stay_in_the_repository():
    link = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for target in link.findall(page.read_text()):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            resolved = (page.parent / target).resolve()
            assert resolved.is_relative_to(ROOT) and resolved.exists(), f"{page.relative_to(ROOT)} links {target}"


def test_architecture_page_names_every_module_and_no_stale_one():
    """docs/architecture.md matches the code: every module of the package is named there, and every ``_x.py`` /
    ``.h`` / ``.cpp`` it names exists; the op count it gives is the number of ops ``deploy/_ops.py`` defines."""
    page = (ROOT / "docs" / "architecture.md").read_text()
    pkg = ROOT / "lightning_winoprune"
    modules = {p.name for p in pkg.rglob("_*.py") if p.name != "__init__.py"}
    sources = {p.name for p in (ROOT / "csrc").iterdir() if p.suffix in (".h", ".cpp")}
    named = set(re.findall(r"`(_[a-z0-9_]+\.py)`", page)) | set(re.findall(r"`([a-z0-9_]+\.(?:h|cpp))`", page))
    assert not modules - named, f"modules missing from docs/architecture.md: {sorted(modules - named)}"
    stale = named - modules - sources
    assert not stale, f"docs/architecture.md names files that do not exist: {sorted(stale)}"
    assert not sources - named, f"C++ sources missing from docs/architecture.md: {sorted(sources - named)}"
    ops = re.findall(r'_LIB\.define\("([a-z0-9_]+)\(', (pkg / "deploy" / "_ops.py").read_text())
    words = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}
    assert f"{words[len(ops)]} `winoprune::` ops" in page, f"the page should say {words[len(ops)]} ops: {ops}"
    assert all(f"`{op}`" in page for op in ops), ops
