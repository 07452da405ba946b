"""`make demo` installs no DeepSpeed (only `make test` does): every module must import without it.

accelerate re-exports its DeepSpeed helpers (``DummyOptim``...) from ``accelerate.utils`` only when DeepSpeed is
installed, so an import that works in the test venv can fail on a user's fresh one; this runs the imports in a
process where ``deepspeed`` is absent (``sys.modules[name] = None``: find_spec answers None, import raises).
"""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import importlib, pkgutil, sys
sys.modules["deepspeed"] = None
import accelerate.utils
assert not hasattr(accelerate.utils, "DummyOptim"), "deepspeed still visible to accelerate"
import humanalign
failed = []
for info in pkgutil.walk_packages(humanalign.__path__, "humanalign."):
    try:
        importlib.import_module(info.name)
    except Exception as e:
        failed.append(f"{info.name}: {type(e).__name__}: {e}")
print("\\n".join(failed) or "ok")
"""


def test_every_module_imports_without_deepspeed():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok", out.stdout
