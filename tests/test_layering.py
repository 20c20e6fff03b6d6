"""The layering contract (pyproject.toml, [tool.importlinter]) and imports in any order.

import-linter reads every import, function-level ones included, so a lower layer cannot reach up even lazily.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_layering_contract_is_kept():
    exe = shutil.which("lint-imports")
    assert exe is not None, "import-linter is a test dependency: pip install -e '.[test]'"
    proc = subprocess.run([exe, "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


_IMPORT_EACH_FIRST = r"""
import importlib, pkgutil, sys
import onnxprune
names = sorted(m.name for m in pkgutil.walk_packages(onnxprune.__path__, "onnxprune."))
for first in names:
    for loaded in [m for m in sys.modules if m == "onnxprune" or m.startswith("onnxprune.")]:
        del sys.modules[loaded]
    importlib.import_module(first)  # this module first, as a fresh interpreter would import it
print(len(names))
"""


def test_every_module_imports_first():
    """Each module imported first into a fresh onnxprune (third-party packages stay loaded): a cycle that only
    shows in some import order fails here."""
    proc = subprocess.run([sys.executable, "-c", _IMPORT_EACH_FIRST], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split()[-1]) > 60


def test_one_place_builds_sessions():
    """Every onnxruntime session is built in onnxprune/runtime/session.py (its reference-evaluator fallback
    too; graph/ folds constant subgraphs with onnx's evaluator, which runs no model)."""
    places = [p.relative_to(ROOT).as_posix() for p in (ROOT / "onnxprune").rglob("*.py")
              if "InferenceSession(" in p.read_text()]
    assert places == ["onnxprune/runtime/session.py"], places
