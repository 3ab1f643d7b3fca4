"""The package's shape: layered imports (import-linter contract in pyproject.toml), imports at module
top, and modules and functions small enough to read."""

from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "w2s_jax"
MAX_MODULE_LINES = 520  # "about 500"
MAX_FUNCTION_LINES = 85  # "about 80"


def _modules():
    return sorted(p for p in PKG.rglob("*.py"))


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def test_import_contract_holds():
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.fail("lint-imports is missing: `pip install -e '.[test]'` installs import-linter")
    r = subprocess.run([exe], cwd=PKG.parent, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_internal_imports_at_module_top():
    """Every ``w2s_jax`` import is a module-level statement, so the import graph (and the contract
    checked on it) is what a reader sees at the top of each file."""
    inner = []
    for path in _modules():
        tree = _tree(path)
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("w2s_jax"):
                if id(node) not in top and not _in_type_checking(tree, node):
                    inner.append(f"{path.relative_to(PKG.parent)}:{node.lineno} from {node.module}")
            elif isinstance(node, ast.Import) and id(node) not in top:
                inner += [f"{path.relative_to(PKG.parent)}:{node.lineno} import {a.name}"
                          for a in node.names if a.name.startswith("w2s_jax")]
    assert not inner, "imports inside functions:\n" + "\n".join(inner)


def _in_type_checking(tree: ast.Module, node: ast.AST) -> bool:
    for top in tree.body:
        if isinstance(top, ast.If) and "TYPE_CHECKING" in ast.unparse(top.test):
            if any(n is node for n in ast.walk(top)):
                return True
    return False


def test_modules_and_functions_are_small():
    big_modules, big_functions = [], []
    for path in _modules():
        text = path.read_text()
        n = text.count("\n")
        rel = path.relative_to(PKG.parent)
        if n > MAX_MODULE_LINES:
            big_modules.append(f"{rel}: {n} lines")
        for node in ast.walk(_tree(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    big_functions.append(f"{rel}:{node.lineno} {node.name}: {length} lines")
    assert not big_modules, f"modules over {MAX_MODULE_LINES} lines:\n" + "\n".join(big_modules)
    assert not big_functions, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(big_functions)


def test_contract_names_every_subpackage():
    """A new subpackage must be placed in the layer contract, or it escapes the check."""
    text = (PKG.parent / "pyproject.toml").read_text()
    subpackages = sorted(p.name for p in PKG.iterdir() if (p / "__init__.py").exists())
    missing = [s for s in subpackages if f"w2s_jax.{s}" not in text]
    assert not missing, f"subpackages missing from [tool.importlinter] layers: {missing}"
