"""Project hygiene that CI enforces through the test command: lint, types, and the README/CI contract."""

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
    {"_enum", "_io", "_C"},
    {"kernels"},
    {"winograd"},
    {"pruning", "data"},
    {"deploy", "latency", "importance"},
    {"callbacks"},
    {"recipes"},
]


def test_lower_packages_never_import_upper_ones():
    import ast

    level = {name: i for i, names in enumerate(LAYERS) for name in names}
    # within the middle layer: latency and importance build on deploy, never the other way round
    forbidden = {("deploy", "latency"), ("deploy", "importance")}
    problems = []
    for path in sorted((ROOT / "lightning_winoprune").rglob("*.py")):
        rel = path.relative_to(ROOT / "lightning_winoprune").parts
        if len(rel) == 1:
            continue  # the top-level __init__ re-exports everything
        pkg = rel[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lightning_winoprune."):
                target = node.module.split(".")[1]
            elif isinstance(node, ast.ImportFrom) and node.module == "lightning_winoprune":
                target = node.names[0].name
            else:
                continue
            if target in level and (level[target] > level[pkg] or (pkg, target) in forbidden):
                problems.append(f"{path.relative_to(ROOT)}:{node.lineno} {pkg} imports {target}")
    assert not problems, "\n".join(problems)
