"""The architecture's rules, checked: a lower layer never imports a higher one, and the package face is light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "bnlab"

# Each layer may import only the layers below it (and itself). bnlab.errors, version, fileio and data are the
# floor every layer may stand on; nn (the maths and layers) knows nothing of training, training nothing of the
# experiments or the command line.
FORBIDDEN = {
    "kernels": ("nn", "config", "models", "lstm", "training", "check", "lab", "cli", "bench", "reports"),
    "nn": ("config", "models", "lstm", "training", "check", "lab", "cli", "bench", "reports"),
    "training": ("check", "lab", "cli", "bench"),
    "check": ("lab", "cli", "bench"),
    "lab": ("cli",),
}


def bnlab_imports(path: Path) -> set[str]:
    """The bnlab subpackages or modules a file imports, anywhere in it (lazy imports inside functions count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {name.split(".")[1] for name in names if name.startswith("bnlab.")}
    return found


@pytest.mark.parametrize("layer", FORBIDDEN)
def test_no_layer_imports_a_higher_one(layer):
    offences = {
        str(path.relative_to(PACKAGE)): sorted(bnlab_imports(path) & set(FORBIDDEN[layer]))
        for path in (PACKAGE / layer).rglob("*.py")
    }
    offences = {k: v for k, v in offences.items() if v}
    assert not offences, offences


def test_importing_the_layers_loads_neither_the_trainer_nor_the_checker():
    code = (
        "import sys, bnlab.nn; "
        "print(sorted(m for m in sys.modules if m.startswith(('bnlab.training', 'bnlab.check', 'bnlab.lab', "
        "'bnlab.cli', 'bnlab.models'))))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]", loaded


def test_every_public_name_resolves_to_its_owner():
    import bnlab

    for name in bnlab.__all__:
        assert getattr(bnlab, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        bnlab.nonexistent  # noqa: B018
