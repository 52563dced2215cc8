"""The package's import layering (DESIGN.md, "Layers"), enforced by import-linter.

The contracts live in ``pyproject.toml`` under ``[tool.importlinter]``: the layers from ``cli`` at
the top down to ``_utils``, the two sides (sampling: fields, guidance, solvers, likelihood,
fokker_planck; training: train, losses, couplings, nn, data) that do not know each other, the
oracles of ``flowdiff.testing`` kept out of the library, and no import circle between sibling
modules at any depth. ``lint-imports`` is run as a separate process (the way a developer runs it),
and its report is the failure message.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess[str]:
    # The entry point of the `lint-imports` script, with this interpreter (import-linter is in the
    # test extra: a missing installation is a failure, not a skip, or the contracts would go unchecked).
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run(
        [sys.executable, "-c", code, "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_import_contracts_hold() -> None:
    result = _lint_imports(ROOT)
    if "No module named 'importlinter'" in result.stderr:
        pytest.fail("import-linter is not installed: run scripts/setup.sh (it is in the test extra)")
    report = result.stdout + result.stderr
    assert result.returncode == 0, f"import contracts broken (pyproject.toml [tool.importlinter]):\n{report}"
    assert "0 broken" in report


def test_an_upward_import_breaks_the_contracts(tmp_path: Path) -> None:
    """The contracts can fail: a copy of the package whose ``paths`` layer imports ``solvers``."""
    source = tmp_path / "src"
    shutil.copytree(ROOT / "flowdiff", source / "flowdiff", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    paths_init = source / "flowdiff" / "paths" / "__init__.py"
    paths_init.write_text(paths_init.read_text() + "\nfrom .. import solvers  # an arrow up\n")
    result = _lint_imports(tmp_path, pythonpath=source)
    report = result.stdout + result.stderr
    assert str(source) in _where_flowdiff_is(tmp_path, source), "the copy, not the installed package, must be linted"
    assert result.returncode != 0, report
    assert "flowdiff.paths is not allowed to import flowdiff.solvers" in report, report
    assert "flowdiff.paths -> flowdiff.solvers" in report, report


def _where_flowdiff_is(cwd: Path, pythonpath: Path) -> str:
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    code = "import importlib.util; print(importlib.util.find_spec('flowdiff').origin)"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=60).stdout


def test_package_sources_compile_without_warnings() -> None:
    """No invalid escape sequences (``"\\d"`` in a non-raw docstring) or other compile-time warnings:
    they become SyntaxErrors in a future Python."""
    import warnings

    bad = []
    for file in sorted((ROOT / "flowdiff").rglob("*.py")):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            try:
                compile(file.read_text(encoding="utf-8"), str(file), "exec")
            except (SyntaxError, SyntaxWarning) as err:
                bad.append(f"{file.relative_to(ROOT)}: {err}")
    assert not bad, "\n".join(bad)
