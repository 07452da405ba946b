#!/usr/bin/env bash
# Everything issue 16 measures on a GPU, in one call (benchmarks/gpu/run.py says what; docs/benchmarks/gpu.md
# gives the device call). Usage, from anywhere:
#
#   bash benchmarks/gpu/run.sh [OUT_DIR]            # on the GPU machine; OUT_DIR defaults to $OUT
#   bash benchmarks/gpu/run.sh --smoke OUT_DIR      # on the CPU: the tiny model, every section, a few minutes
#   bash benchmarks/gpu/run.sh OUT_DIR --sections dpo,rm    # more arguments go to run.py (a second call)
#
# On the GPU machine the wheels in .whl/ (benchmarks/gpu/prepare.sh) are installed into /tmp/site first: the
# packages its image lacks (trl, datasets, pydantic, gguf and their needs). The whole run is held to BUDGET_S seconds (default 560: inside a 600 s device call);
# run.py's sections keep to their own budgets within it.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
SMOKE=""
if [ "${1:-}" = "--smoke" ]; then SMOKE="--smoke"; shift; fi
OUT_DIR="${1:-${OUT:-gpu_results}}"
[ $# -gt 0 ] && shift
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
if [ -z "$SMOKE" ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing .whl/ failed" >&2; exit 2; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false \
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONWARNINGS=ignore
BUDGET="${BUDGET_S:-560}"
timeout --kill-after=15 "$BUDGET" "$PY" benchmarks/gpu/run.py $SMOKE --budget $((BUDGET - 20)) "$@" "$OUT_DIR" 2>&1 \
  | tee "$OUT_DIR/run.log"
exit "${PIPESTATUS[0]}"
