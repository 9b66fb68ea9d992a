"""Project hygiene that CI enforces through the test command: lint, types, and the README/CI contract."""

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed (pip install -e '.[test]')")
def test_ruff_clean():
    out = subprocess.run(["ruff", "check", "lightning_winoprune", "tests", "benchmarks"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_clean():
    pytest.importorskip("mypy")
    out = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, flags=re.S)
    commands = [line.strip() for b in blocks for line in b.splitlines() if line.strip()]
    test_cmd = next(c for c in commands if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in [line.strip() for line in ci.splitlines()]


def test_public_api_is_explicit():
    import lightning_winoprune as lw

    assert set(lw.__all__) <= set(dir(lw))
    assert (ROOT / "lightning_winoprune" / "py.typed").exists()


#: The layers, lowest first: a package may import only from its own layer or lower ones (not even inside functions).
LAYERS = [
    {"_enum", "_io", "_utils"},
    {"kernels"},
    {"winograd"},
    {"pruning", "data"},
    {"deploy", "latency", "importance"},
    {"callbacks"},
    {"recipes"},
]
#: Within the middle layer: latency and importance build on deploy, never the other way round.
FORBIDDEN = {("deploy", "latency"), ("deploy", "importance")}


def _package_imports(tree: ast.AST) -> list[tuple[int, str]]:
    """``(line, floor)`` of every import of the package in a module, at any depth (inside functions too).

    ``from lightning_winoprune.a.b import x`` names floor ``a``; ``from lightning_winoprune import x, y`` names ``x``
    and ``y``; ``import lightning_winoprune.a`` names ``a``; a relative ``from .x import y`` names the module's own
    floor, so it is never a problem.
    """
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            parts = node.module.split(".")
            if parts[0] != "lightning_winoprune":
                continue
            targets = parts[1:2] or [alias.name for alias in node.names]
            found.extend((node.lineno, t) for t in targets)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "lightning_winoprune":
                    found.append((node.lineno, parts[1] if len(parts) > 1 else "__init__"))
    return found


def test_lower_packages_never_import_upper_ones():
    level = {name: i for i, names in enumerate(LAYERS) for name in names}
    problems, checked = [], 0
    for path in sorted((ROOT / "lightning_winoprune").rglob("*.py")):
        rel = path.relative_to(ROOT / "lightning_winoprune").parts
        if rel == ("__init__.py",):
            continue  # the top-level __init__ re-exports everything
        floor = rel[0].removesuffix(".py")
        assert floor in level, f"{path.relative_to(ROOT)}: add its floor {floor!r} to LAYERS"
        for lineno, target in _package_imports(ast.parse(path.read_text())):
            checked += 1
            if target == "__init__" or target not in level:
                problems.append(f"{path.relative_to(ROOT)}:{lineno} imports the package root or an unknown "
                                f"floor {target!r} (import from the module that defines the name)")
            elif level[target] > level[floor] or (floor, target) in FORBIDDEN:
                problems.append(f"{path.relative_to(ROOT)}:{lineno} {floor} imports {target}")
    assert checked > 150, f"only {checked} imports found: the scan is broken"
    assert not problems, "\n".join(problems)


def test_the_layering_scan_sees_every_import_form():
    tree = ast.parse(
        "from lightning_winoprune.recipes._cli import main\n"
        "from lightning_winoprune import callbacks, deploy\n"
        "def f():\n    import lightning_winoprune.latency\n"
        "from . import sibling\n"
    )
    assert [t for _, t in _package_imports(tree)] == ["recipes", "callbacks", "deploy", "latency"]
