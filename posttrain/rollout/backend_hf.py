"""transformers backend: HF ``generate`` for architectures vLLM cannot run here (e.g. NemotronH
MoE on vLLM-CPU), and a reference to check vLLM's logprobs against. Slower, same interface."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from posttrain import models
from posttrain.config import ModelConfig, RolloutConfig
from posttrain.rollout.budget import HFThinkingBudget
from posttrain.rollout.types import GeneratedTokens, RolloutError, SamplingSpec, WeightUpdate
from posttrain.rollout.weight_sync import weight_files


class HFBackend:
    """Generate, score and swap weights of one in-memory ``transformers`` model."""

    name = "transformers"

    def __init__(self, model_dir: str, model: ModelConfig, cfg: RolloutConfig, rank: int = 0) -> None:
        import torch

        torch.set_num_threads(cfg.engine_threads())
        self.cfg = cfg
        source = model.model_copy(update={"name": model_dir, "dtype": cfg.engine_dtype(model)})  # name: resolved
        self.model = models.model_for(source)
        self.tokenizer = models.tokenizer_for(source)
        self.pad_id = self.tokenizer.pad_token_id
        self._base_state: dict[str, Any] | None = None  # kept while a LoRA delta is merged in
        self._device: Any = None  # where the model lives while awake (set by sleep)

    def generate(self, prompts: list[list[int]], spec: SamplingSpec,
                 budget_mask: list[bool]) -> list[list[GeneratedTokens]]:
        """Prompts run one batch per budget setting and max_tokens (a logits processor spans a whole batch);
        each prompt is repeated ``n`` times (greedy decoding refuses ``num_return_sequences > 1``). Sampling
        is seeded per batch, so unlike vLLM's per-request seeds, samples depend on how requests were batched."""
        result: list[list[GeneratedTokens] | None] = [None] * len(prompts)
        settings = sorted({(bool(budget_mask[p]), spec.max_tokens_of(p)) for p in range(len(prompts))})
        for use_budget, max_tokens in settings:  # token-id requests may each have their own max_tokens
            idx = [p for p in range(len(prompts)) if (bool(budget_mask[p]), spec.max_tokens_of(p)) == (use_budget, max_tokens)]
            budget = spec.reasoning_budget if use_budget else None
            part = replace(spec, max_tokens=max_tokens, first_index=spec.index(idx[0]), indices=None, max_tokens_each=None,
                           resumed_each=None)
            resumed = [spec.resumed_of(prompts[i], i) for i in idx]
            for i, samples in zip(idx, self._generate([prompts[i] for i in idx], part, budget, resumed)):
                result[i] = samples
        return [r or [] for r in result]

    def _generate(self, prompts: list[list[int]], spec: SamplingSpec, budget: int | None,
                  resumed: list[list[int]]) -> list[list[GeneratedTokens]]:
        import torch
        from transformers import LogitsProcessorList

        ids, mask = self._left_pad([p for p in prompts for _ in range(spec.n)])  # [B*n, T]
        rows = [r for r in resumed for _ in range(spec.n)]
        processors = [HFThinkingBudget(self.tokenizer, budget, spec.budget_grace, rows)] if budget is not None else []
        sampling = (dict(do_sample=True, temperature=spec.temperature, top_p=spec.top_p, top_k=0)
                    if spec.temperature > 0 else dict(do_sample=False, temperature=None, top_p=None, top_k=None))
        torch.manual_seed(spec.seed + spec.first_index)  # per call: samples depend on the batch make-up
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=spec.max_tokens,
                logits_processor=LogitsProcessorList(processors), return_dict_in_generate=True,
                output_scores=self.cfg.logprobs == "processed", output_logits=self.cfg.logprobs == "raw",
                eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.pad_id, **sampling)
        steps = out.scores if self.cfg.logprobs == "processed" else out.logits  # T x [B*n, V]
        new = out.sequences[:, ids.shape[1] :]  # [B*n, T]
        logps = torch.stack([torch.log_softmax(s.float(), -1) for s in steps], 1)  # [B*n, T, V]
        picked = logps.gather(2, new[:, :, None])[:, :, 0]  # [B*n, T]
        top = None
        if spec.top_logprobs:
            top_values, top_ids = logps.topk(spec.top_logprobs, dim=-1)  # [B*n, T, k]
            top = [[dict(zip(i, v)) for i, v in zip(top_ids[r].tolist(), top_values[r].tolist())]
                   for r in range(new.shape[0])]
        samples = [self._trim(new[r].tolist(), picked[r].tolist(), top[r] if top else None)
                   for r in range(new.shape[0])]
        return [samples[p * spec.n : (p + 1) * spec.n] for p in range(len(prompts))]

    def _trim(self, tokens: list[int], logprobs: list[float],
              top: list[dict[int, float]] | None = None) -> GeneratedTokens:
        eos = self.tokenizer.eos_token_id
        end = tokens.index(eos) + 1 if eos in tokens else len(tokens)
        top = [{**t, tok: lp} for t, tok, lp in zip(top[:end], tokens, logprobs)] if top is not None else None
        return GeneratedTokens(tokens[:end], logprobs[:end], "stop" if eos in tokens else "length", top)

    def _left_pad(self, prompts: list[list[int]]) -> tuple[Any, Any]:
        import torch

        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        return ids.to(self.model.device), mask.to(self.model.device)

    def score(self, sequences: list[list[int]], starts: list[int]) -> list[list[float]]:
        from posttrain.rollout.weight_sync import sequence_logprobs

        return [sequence_logprobs(self.model, seq, max(start, 1)) for seq, start in zip(sequences, starts)]

    def apply(self, update: WeightUpdate) -> None:
        """Full: load the tensors in place. LoRA: base + B·A·scale merged (base kept to undo)."""
        from safetensors.torch import load_file

        if update.transport != "shm":
            raise RolloutError(f"transformers backend has no transport {update.transport!r} (have: shm)")
        if update.kind == "full":
            state = {}  # one file, or the parts a sharded trainer streamed
            for path in weight_files(update.path):
                state.update(load_file(path))
            self._base_state = None
            self._load(state)
        else:
            self._merge_lora(update.path)

    def _load(self, state: dict[str, Any]) -> None:
        tied = models.head_is_tied(self.model)  # a truly tied head comes as the embedding; any other must be sent
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not (k == "lm_head.weight" and tied)]
        if unexpected or missing:
            raise RolloutError(f"weight update does not match the model: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
        if tied:
            self.model.tie_weights()

    def _merge_lora(self, folder: str) -> None:
        from posttrain.rollout.lora import merged_state

        if self._base_state is None:
            self._base_state = {k: v.clone() for k, v in self.model.state_dict().items()}
        self._load(merged_state(self._base_state, folder))

    def sleep(self, level: int) -> None:
        """The model to host memory (a CUDA engine's GPU memory freed for a colocated trainer); nothing on CPU."""
        self._device = next(self.model.parameters()).device
        if self._device.type != "cpu":
            import torch

            self.model.to("cpu")
            torch.cuda.empty_cache()

    def wake(self) -> None:
        if self._device is not None and self._device.type != "cpu":
            self.model.to(self._device)

    def shutdown(self) -> None:
        self.model = None
