"""tests/gpu/harness.py as the module ``humanalign_gpu_harness``: loaded here, before this folder's test modules
are imported (pytest runs with --import-mode=importlib, so a sibling file is not importable by its name)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

if "humanalign_gpu_harness" not in sys.modules:
    _spec = importlib.util.spec_from_file_location("humanalign_gpu_harness", Path(__file__).with_name("harness.py"))
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = _module
    _spec.loader.exec_module(_module)
