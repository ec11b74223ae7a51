"""The package surface: docstring examples run, imports stay light."""

from __future__ import annotations

import doctest
import importlib
import subprocess
import sys

import pytest

PUBLIC_MODULES = [
    "robust_reg",
    "robust_reg.attacks",
    "robust_reg.regularizer",
    "robust_reg.warm_start",
    "robust_reg.bound",
    "robust_reg.probe",
    "robust_reg.evaluation",
    "robust_reg.methods",
    "robust_reg._state",
]


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0


# Result containers are documented through the functions that return them.
RESULT_TYPES = {"BoundReport", "RobustnessCurve", "RegularizerOutput", "RegularizerStats", "MethodSettings"}


@pytest.mark.parametrize("name", sorted(set(importlib.import_module("robust_reg").__all__) - RESULT_TYPES))
def test_public_api_has_a_runnable_example(name):
    import robust_reg

    assert ">>>" in (getattr(robust_reg, name).__doc__ or "")


def test_import_needs_neither_lightly_nor_lightning():
    code = (
        "import sys, robust_reg, robust_reg.integrations\n"
        "heavy = ('lightly', 'pytorch_lightning', 'lightning', 'solo')\n"
        "print(any(m.split('.')[0] in heavy for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_integrations_install_as_a_subpackage():
    import robust_reg.integrations

    assert robust_reg.integrations.__name__ == "robust_reg.integrations"


def _function_lengths():
    """``(lines without the docstring, "path:line name")`` of every function in the shipped code."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for folder in ("robust_reg", "integrations"):
        for path in sorted((root / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    doc = node.body[0] if node.body else None
                    if isinstance(doc, ast.Expr) and isinstance(getattr(doc, "value", None), ast.Constant):
                        lines -= doc.end_lineno - doc.lineno + 1
                    yield lines, f"{path.relative_to(root)}:{node.lineno} {node.name}"


def test_every_shipped_function_stays_under_60_lines_without_its_docstring():
    long = sorted((n, where) for n, where in _function_lengths() if n >= 60)
    assert not long, f"split these: {long}"
