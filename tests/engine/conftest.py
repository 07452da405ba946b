"""Make the shared toy run (engine_toy.py, also a subprocess script) importable from the engine tests."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

# The scale-out tests' module-scoped fixtures (each test_scale_out_*.py file builds its own).
from scale_out import ddp_ppo_lag, demo_pairs, one_process_dpo, tiny_score_models  # noqa: E402, F401
