"""The package's structure rules, checked on the source (ast), so a regression fails a test.

- No function or method in src/humanalign is longer than 80 lines (``end_lineno - lineno + 1``, decorators not
  counted).
- Imports sit at module top: an import inside a function is allowed only for the optional heavy dependencies
  (deepspeed, bitsandbytes, wandb, flash_attn) and the cli's documented ``importlib`` dispatch. import-linter
  checks which way the imports point; this checks where they are.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "humanalign"
MAX_FUNCTION_LINES = 80
OPTIONAL_DEPS = {"deepspeed", "bitsandbytes", "wandb", "flash_attn"}


def _modules() -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text(), filename=str(p))) for p in sorted(PACKAGE.rglob("*.py"))]


def _functions(tree: ast.AST):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def long_functions() -> list[str]:
    out = []
    for path, tree in _modules():
        for fn in _functions(tree):
            length = fn.end_lineno - fn.lineno + 1
            if length > MAX_FUNCTION_LINES:
                out.append(f"{path.relative_to(PACKAGE)}:{fn.lineno} {fn.name} ({length} lines)")
    return out


def _allowed_local_import(node: ast.Import | ast.ImportFrom) -> bool:
    names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
    return all(name.split(".")[0] in OPTIONAL_DEPS for name in names)


def function_local_imports() -> list[str]:
    out = []
    for path, tree in _modules():
        for fn in _functions(tree):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)) and not _allowed_local_import(node):
                    names = ", ".join(a.name for a in node.names)
                    where = f"from {node.module} " if isinstance(node, ast.ImportFrom) else ""
                    out.append(f"{path.relative_to(PACKAGE)}:{node.lineno} in {fn.name}: {where}import {names}")
    return out


def test_functions_are_under_80_lines():
    assert long_functions() == []


def test_imports_inside_functions_only_for_optional_deps():
    assert function_local_imports() == []


def test_the_checks_see_what_they_should():
    """The walkers find a long function and a local import when there is one (the checks are not vacuous)."""
    body = "\n".join(f"    x{i} = {i}" for i in range(81))
    tree = ast.parse(f"def f():\n    import json\n    import wandb\n{body}\n")
    fn = _functions(tree)[0]
    assert fn.end_lineno - fn.lineno + 1 == 84
    local = [n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert [_allowed_local_import(n) for n in local] == [False, True]
    assert len(_modules()) > 50
