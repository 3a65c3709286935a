"""Per-rank memory of one training step, from a model's HF config alone (no torch, no weights).

What ``posttrain sft --dry-run`` prints before a launch: bytes per rank of

- **parameters**: every weight, divided over the FSDP ranks (``dp_shard x cp``) when sharded;
- **gradients**: the trainable ones, same dtype and sharding as the parameters;
- **optimizer**: AdamW's two moments per trainable weight. ``torch.optim.AdamW`` (what the trainer
  builds) keeps them in the parameters' dtype, so bf16 weights get bf16 moments and no master copy;
  ``StepShape.fp32_master`` plans the usual mixed-precision layout instead (fp32 moments + an fp32
  master copy: 12 bytes per bf16 weight), and the table's note gives that total too;
- **FSDP buffers**: the gathered (unsharded) parameters of the largest block, twice (prefetch);
- **activations**, for ``tokens / cp`` tokens on this rank: the final hidden states and their
  gradient; with gradient checkpointing the saved input of every layer plus the larger of one
  layer's recomputed working set (forward, plus :data:`GRAD_SHARE` of it in gradients) and the
  chunked loss's block (one ``[chunk, vocab]`` fp32 logits tensor turned into its own gradient in
  place, with bf16 weights also the head's bf16 output, and one chunk's head gradient): the loss
  runs its backward and frees its block before the first layer is recomputed, so the two never
  coexist. Without checkpointing every layer's working set stays alive next to the loss block.

With ``train.mixed_precision: bf16`` over fp32 weights (``StepShape.autocast``) activations are bf16 and
every linear's weight is cast to bf16 and kept for its backward (a bf16 copy of the linear weights, measured
with saved-tensor hooks); FSDP on GPUs gathers the weights in bf16 already, so it makes no copies.

Layer kinds: ``*`` attention, ``-`` MLP (NemotronH), ``M`` Mamba2, ``E`` MoE; a Llama-style block is
``*`` + a gated MLP. NemotronH's pattern comes from ``hybrid_override_pattern`` (or
``layers_block_type``). Per-token working sets follow the code we run: attention through SDPA's
flash path (no ``[T, T]`` matrix; context parallelism all-gathers K/V, so the gathered K/V are
``cp`` times the local ones), Mamba2 through the pure-torch chunked scan (intra-chunk ``[chunk]``
decay and score rows per head: the fused ``mamba_ssm`` kernels on GPU need less, so the estimate
is an upper bound there). Not counted: the CUDA context, allocator fragmentation, communication
buffers other than FSDP's gathered block, the interpreter.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# At a layer's backward peak its forward working set is alive plus gradients worth about a fifth of it
# (autograd frees each intermediate once used): measured live memory (bench/memory_plan_check.py,
# MALLOC_MMAP_THRESHOLD_ fixed) gave 1.2x on tiny-llama and 1.07x on tiny-nemotron-h; 2x (the set and
# all its gradients at once) over-counted by 1.5-1.7x.
GRAD_SHARE = 0.25
# NemotronH block types (transformers' names old and new) -> the pattern's letters
LAYER_KINDS = {"mamba": "M", "linear_attention": "M", "attention": "*", "full_attention": "*", "moe": "E", "mlp": "-"}


@dataclass(frozen=True)
class StepShape:
    """What the run does, as far as memory is concerned."""

    tokens: int  # tokens of one micro-batch (the packed context), all of them on one cp group
    dtype: str = "float32"  # parameter (and activation) dtype
    world: int = 1  # processes
    cp: int = 1  # context-parallel size: each rank holds tokens / cp
    fsdp: bool = False  # shard parameters, gradients, optimizer over world ranks
    lora_r: int = 0  # 0: full fine-tuning
    lora_targets: tuple[str, ...] = ()  # module name suffixes (q_proj, ...); () with lora_r: every linear
    freeze_layers: int = 0  # embeddings + first N layers frozen
    freeze_router: bool = False
    gradient_checkpointing: bool = True
    loss_chunk: int = 2048
    fp32_master: bool = False  # AdamW with fp32 moments + fp32 master weights (bf16/fp16 parameters)
    # train.mixed_precision: bf16 over fp32 weights (torch.autocast): activations in bf16, and each linear's
    # weight cast to bf16 and saved for backward (the LM head stays fp32 in our chunked loss)
    autocast: str | None = None


@dataclass
class Layer:
    kind: str  # "*", "-", "M", "E", or "L" (Llama block: attention + gated MLP)
    linears: dict[str, tuple[int, int]]  # name -> (in, out) features
    other: int  # parameters outside the linears (norms, conv, A_log, D, dt_bias, router bias)
    act_per_token: float  # elements held while this layer is recomputed / differentiated (one token)
    router: int = 0  # router (gate) parameters, inside ``other``

    @property
    def params(self) -> int:
        return sum(i * o for i, o in self.linears.values()) + self.other


@dataclass
class ModelShape:
    hidden: int
    vocab: int
    tied: bool
    layers: list[Layer]
    final_norm: int

    @property
    def params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.final_norm + sum(l.params for l in self.layers)


@dataclass
class MemoryPlan:
    """Bytes per rank, by row; ``table()`` prints them."""

    rows: dict[str, int]
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.rows.values())

    def fits(self, device_bytes: int) -> bool:
        return self.total <= device_bytes

    def table(self, device_bytes: int | None = None) -> str:
        lines = ["memory plan, per rank:", f"  {'':<50}{'GiB':>10}"]
        lines += [f"  {name:<50}{b / GIB:>10.2f}" for name, b in self.rows.items()]
        lines.append(f"  {'total':<50}{self.total / GIB:>10.2f}")
        if device_bytes:
            verdict = "fits" if self.fits(device_bytes) else "does NOT fit"
            lines.append(f"  {verdict} in {device_bytes / GIB:.1f} GiB per device "
                         f"({100 * self.total / device_bytes:.0f}% used)")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# --------------------------------------------------------------------------- model shape


def _pattern(cfg: dict[str, Any]) -> str:
    if cfg.get("hybrid_override_pattern"):
        return cfg["hybrid_override_pattern"]
    kinds = cfg.get("layers_block_type")
    if kinds:
        return "".join(LAYER_KINDS[k] for k in kinds)
    raise ValueError("nemotron_h config has neither hybrid_override_pattern nor layers_block_type")


def _attention(cfg: dict[str, Any], h: int, cp: int) -> tuple[dict[str, tuple[int, int]], float]:
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or h // heads
    lin = {"q_proj": (h, heads * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd), "o_proj": (heads * hd, h)}
    # norm out, q (+ rotated), k/v (+ rotated k; all-gathered over cp), attention out, o out
    act = h + 2 * heads * hd + 3 * kv * hd * cp + heads * hd + h
    return lin, act


def _llama_mlp(h: int, inter: int) -> tuple[dict[str, tuple[int, int]], float]:
    return ({"gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)},
            h + 4 * inter + h)  # norm out, gate, up, act, product, down out


def _mamba(cfg: dict[str, Any], h: int) -> tuple[dict[str, tuple[int, int]], int, float]:
    nh, hd, s, ng = cfg["mamba_num_heads"], cfg["mamba_head_dim"], cfg["ssm_state_size"], cfg["n_groups"]
    chunk, kernel = cfg.get("chunk_size", 128), cfg.get("conv_kernel", 4)
    di = nh * hd
    conv = di + 2 * ng * s
    lin = {"in_proj": (h, 2 * di + 2 * ng * s + nh), "out_proj": (di, h)}
    other = conv * kernel + (conv if cfg.get("use_conv_bias", True) else 0) + 3 * nh + di + h  # conv, A,D,dt, norms
    # pure-torch SSD: in_proj out, conv in/out, B/C per head, x*dt, intra-chunk decay L, scores C.B and
    # their product (nh x chunk each), chunk-diagonal y, states share, gated-norm in/out, out_proj out
    act = h + (2 * di + 2 * ng * s + nh) + 2 * conv + 2 * nh * s + 2 * di + 4 * nh * chunk + 4 * di + h
    return lin, other, act


def _moe(cfg: dict[str, Any], h: int) -> tuple[dict[str, tuple[int, int]], int, int, float]:
    e, k, mi = cfg["n_routed_experts"], cfg["num_experts_per_tok"], cfg["moe_intermediate_size"]
    si = cfg.get("moe_shared_expert_intermediate_size", 0) * cfg.get("n_shared_experts", 1)
    lin = {"experts.up_proj": (h, e * mi), "experts.down_proj": (e * mi, h),
           "shared_experts.up_proj": (h, si), "shared_experts.down_proj": (si, h)}
    router = e * h  # gate weight (its score-correction bias is a buffer)
    # norm out, router logits/scores, per routed copy: input, up, act, down out; shared: up, act, out
    act = h + 3 * e + k * (2 * h + 2 * mi) + 2 * si + h
    return lin, router + h, router, act


def model_shape(cfg: dict[str, Any], cp: int = 1) -> ModelShape:
    """Layers and their parameters / working sets from an HF ``config.json`` dict (Llama-style or NemotronH)."""
    h, vocab = cfg["hidden_size"], cfg["vocab_size"]
    layers: list[Layer] = []
    if cfg.get("model_type") == "nemotron_h":
        for kind in _pattern(cfg):
            if kind == "M":
                lin, other, act = _mamba(cfg, h)
                layers.append(Layer("M", lin, other, act))
            elif kind == "*":
                lin, act = _attention(cfg, h, cp)
                layers.append(Layer("*", lin, h, act))
            elif kind == "E":
                lin, other, router, act = _moe(cfg, h)
                layers.append(Layer("E", lin, other, act, router))
            elif kind == "-":
                inter = cfg["intermediate_size"]
                layers.append(Layer("-", {"up_proj": (h, inter), "down_proj": (inter, h)}, h, 2 * h + 2 * inter))
            else:
                raise ValueError(f"unknown NemotronH layer kind {kind!r} in its pattern")
        tied = False  # transformers 5.19 keeps NemotronH's head separate whatever tie_word_embeddings says
    else:
        for _ in range(cfg["num_hidden_layers"]):
            alin, aact = _attention(cfg, h, cp)
            mlin, mact = _llama_mlp(h, cfg["intermediate_size"])
            layers.append(Layer("L", {**alin, **mlin}, 2 * h, aact + mact))
        tied = bool(cfg.get("tie_word_embeddings", False))
    return ModelShape(hidden=h, vocab=vocab, tied=tied, layers=layers, final_norm=h)


def _lora_params(layer: Layer, r: int, targets: tuple[str, ...]) -> int:
    total = 0
    for name, (i, o) in layer.linears.items():
        if name.startswith("experts."):
            continue  # peft does not wrap the fused expert tensors
        if not targets or name.rsplit(".", 1)[-1] in targets:
            total += r * (i + o)
    return total


# --------------------------------------------------------------------------- the plan


def plan(cfg: dict[str, Any], step: StepShape) -> MemoryPlan:
    """Per-rank bytes of one step of ``step`` on the model ``cfg`` (an HF config dict)."""
    if step.cp < 1 or step.world % step.cp:
        raise ValueError(f"the context-parallel size must divide the number of processes (cp={step.cp}, "
                         f"world={step.world})")
    m = model_shape(cfg, step.cp)
    pb = DTYPE_BYTES[step.dtype]
    shard = step.world if step.fsdp else 1
    total = m.params
    embed = m.vocab * m.hidden
    if step.lora_r:
        trainable = sum(_lora_params(layer, step.lora_r, step.lora_targets) for layer in m.layers)
    else:
        frozen = (embed if step.freeze_layers else 0) + sum(l.params for l in m.layers[:step.freeze_layers])
        frozen += sum(l.router for l in m.layers[step.freeze_layers:]) if step.freeze_router else 0
        trainable = total - frozen
    adam_like_params, adam_master = trainable * 2 * pb, trainable * (12 if pb < 4 else 8)
    optimizer = adam_master if step.fp32_master else adam_like_params
    rows = {
        f"parameters ({total / 1e9:.3g}B)": (total + (trainable if step.lora_r else 0)) * pb // shard,
        f"gradients ({trainable / 1e9:.3g}B trainable)": trainable * pb // shard,
        ("optimizer (AdamW, fp32 moments + master)" if step.fp32_master and pb < 4
         else f"optimizer (AdamW moments, {step.dtype})"): optimizer // shard,
    }
    if step.fsdp and shard > 1:
        rows["FSDP gathered blocks (2 x largest)"] = 2 * max(l.params for l in m.layers) * pb
    ab = DTYPE_BYTES[step.autocast] if step.autocast else pb  # activations' bytes per element
    if ab < pb:
        linears = sum(i * o for layer in m.layers for i, o in layer.linears.values())
        rows[f"autocast: {step.autocast} copies of the linear weights"] = linears * ab
    t = -(-step.tokens // step.cp)  # tokens on this rank
    chunk = min(step.loss_chunk, t)
    block = (4 + (pb if pb < 4 else 0)) * chunk * m.vocab  # fp32 logits (+ the head's own-dtype output)
    loss = (f"loss: [{chunk}, {m.vocab}] fp32 logits block", block + m.vocab * m.hidden * pb)  # + a head grad
    rows["final hidden + its gradient"] = 2 * t * m.hidden * ab
    later = None
    if step.gradient_checkpointing:
        rows[f"activations: saved layer inputs ({len(m.layers)} x {t} tok)"] = len(m.layers) * t * m.hidden * ab
        working = int((1 + GRAD_SHARE) * max(l.act_per_token for l in m.layers) * t * ab)
        layer = ("activations: one layer recomputed + grads", working)
        # the loss's backward finishes (its block freed) before the first layer is recomputed
        (name, size), later = sorted([layer, loss], key=lambda row: row[1], reverse=True)
        rows[name] = size
    else:
        held = sum(l.act_per_token for l in m.layers) + GRAD_SHARE * max(l.act_per_token for l in m.layers)
        rows[f"activations: all layers ({t} tok)"] = int(held * t * ab)
        rows[loss[0]] = loss[1]
    notes = [f"{step.world} ranks = dp_shard {step.world // step.cp} x cp {step.cp}; {t} tokens per rank; "
             f"{'FSDP over ' + str(shard) + ' ranks' if shard > 1 else 'weights replicated'}; {step.dtype}"]
    if later:
        notes.append(f"{later[0]} ({later[1] / GIB:.2f} GiB) not at the peak: the loss's backward frees it "
                     "before the layers are recomputed, so only the larger of the two counts")
    if pb < 4 and not step.fp32_master:
        extra = (adam_master - adam_like_params) // shard
        notes.append(f"mixed-precision AdamW (fp32 moments + master) would add {extra / GIB:.2f} GiB per rank")
    return MemoryPlan(rows, notes)


def parse_bytes(text: str) -> int:
    """``80GiB``, ``80GB``, ``141 GiB``, ``512MiB`` or a plain number of bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"memory size {text!r}: write e.g. 80GiB, 80GB or 512MiB")
    number, prefix, binary = match.groups()
    power = " KMGT".index(prefix.upper() or " ")
    return int(float(number) * (1024 if binary or not prefix else 1000) ** power)


def load_hf_config(name: str, cache_root: Path | None = None) -> dict[str, Any]:
    """An HF config dict without loading weights: a ``.json`` file, a folder with ``config.json``,
    or a built-in model already prepared under ``cache_root/models/NAME``."""
    path = Path(name).expanduser()
    candidates = [path, path / "config.json"]
    if cache_root is not None:
        candidates.append(cache_root / "models" / name / "config.json")
    for c in candidates:
        if c.is_file():
            return json.loads(c.read_text())
    raise FileNotFoundError(f"no HF config for {name!r}: give a config .json (e.g. configs/models/nano3.json), a model "
                            "folder with config.json, or prepare the built-in first (posttrain models prepare NAME)")


def stage_plan(model: Any, train: Any, lora: Any, world: int, device_bytes: int | None = None,
               cache_root: Path | None = None) -> str:
    """The table ``--dry-run`` prints for a training stage's config sections (SFT's, or an RL stage's
    trainer with ``world`` = its workers): ``model`` (ModelConfig), ``train``, ``lora``. A model whose
    ``config.json`` cannot be read (a folder an earlier stage will write) gives one line saying so."""
    try:
        hf = load_hf_config(model.name, cache_root)
    except FileNotFoundError as exc:
        return f"memory plan: skipped ({exc})"
    targets = tuple(lora.target_modules) if isinstance(lora.target_modules, list) else (
        ("q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "up_proj", "down_proj")
        if hf.get("model_type") == "nemotron_h" else ())
    cuda = getattr(train, "num_gpus", 0) > 0
    dtype = ("bfloat16" if cuda else "float32") if model.dtype == "auto" else model.dtype  # as models.resolved_dtype
    # bf16 autocast casts fp32 weights; FSDP on GPUs gathers them in bf16 already (MixedPrecisionPolicy)
    autocast = "bfloat16" if getattr(train, "mixed_precision", "none") == "bf16" and not (cuda and train.fsdp.enabled) else None
    step = StepShape(
        tokens=train.micro_batch_tokens, dtype=dtype, world=world, cp=getattr(train, "context_parallel", 1), autocast=autocast,
        fsdp=train.fsdp.enabled, lora_r=lora.r if lora.enabled else 0, lora_targets=targets,
        freeze_layers=train.freeze_layers, freeze_router=train.freeze_router,
        gradient_checkpointing=train.gradient_checkpointing, loss_chunk=train.loss_chunk_size)
    return plan(hf, step).table(device_bytes)
