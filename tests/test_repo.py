"""The README's promises: its two commands, and CI running the very test command it gives."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    first_screen = "\n".join((ROOT / "README.md").read_text().splitlines()[:40])
    return re.findall(r"```(?:bash|sh)\n(.*?)\n```", first_screen, flags=re.S)


def test_readme_first_screen_gives_exactly_two_commands():
    commands = readme_commands()
    assert len(commands) == 2, commands
    assert "bnlab reproduce" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert readme_commands()[1] in ci


def test_ruff_clean():
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "src", "tests", "benchmarks"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_wheel_ships_every_non_python_file():
    """A plain ``pip install .`` copies only .py files unless package-data names the rest (the kernel source)."""
    import fnmatch

    import pytest

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["bnlab"]
    package = ROOT / "src" / "bnlab"
    data_files = [
        p.relative_to(package).as_posix()
        for p in package.rglob("*")
        if p.is_file() and p.suffix not in {".py", ".pyc"} and "__pycache__" not in p.parts
    ]
    assert data_files, "expected the kernel source under src/bnlab/kernels"
    unshipped = [f for f in data_files if not any(fnmatch.fnmatch(f, pattern) for pattern in patterns)]
    assert not unshipped, f"add these to [tool.setuptools.package-data] in pyproject.toml: {unshipped}"
