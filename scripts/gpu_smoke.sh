#!/usr/bin/env bash
# The GPU path in one run (issue #21): bf16 kernels of the training code, a bf16 SFT step, HF and vLLM
# CUDA generation, two RLVR steps with weight sync; one table at the end (scripts/gpu_smoke.py says
# what each part checks). Needs no network: parts whose packages are missing are skipped and say so.
#
#   scripts/gpu_smoke.sh [--json FILE] [--parts NAME ...]
#
# PYTHON picks the interpreter (default: .venv/bin/python if present, else python3). With
# GPU_SMOKE_INSTALL=1 and a network it first installs the project with the `gpu` extra (vLLM).
# Wheels in .whl/ (carried to an offline GPU box) are installed to /tmp/site first.
# Exit: 0 all parts ok or skipped, 1 a part failed, 3 no CUDA device (at once).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_smoke: no CUDA device here ($PY: torch missing or torch.cuda.is_available() is False): nothing to check" >&2
  exit 3
fi
if [ "${GPU_SMOKE_INSTALL:-0}" = 1 ]; then
  "$PY" -m pip install -q -e '.[gpu]' || { echo "gpu_smoke: installing .[gpu] failed" >&2; exit 1; }
fi
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_smoke: installing the carried wheels failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
exec "$PY" scripts/gpu_smoke.py "$@"
