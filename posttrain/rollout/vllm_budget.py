"""The thinking budget as a vLLM (v1) logits processor.

vLLM builds logits processors from a class path inside its engine process, so this module is
imported there (it needs ``vllm``); the state machine itself is the backend-independent
:class:`posttrain.rollout.budget.BudgetTracker`, shared with the transformers backend.
A request opts in through ``SamplingParams.extra_args``: ``{BUDGET_KEY: N, GRACE_KEY: 0.1}``, plus
``RESUMED_KEY: [ids]`` when it continues a completion (those ids end its prompt and set the budget's state).
"""

from __future__ import annotations

from typing import Any

from vllm import SamplingParams
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

from posttrain.rollout.budget import BudgetSpec, IncrementalBudget

BUDGET_KEY = "posttrain_reasoning_budget"
GRACE_KEY = "posttrain_budget_grace"
RESUMED_KEY = "posttrain_budget_resumed"
CLASS_PATH = "posttrain.rollout.vllm_budget:VLLMThinkingBudget"


class VLLMThinkingBudget(AdapterLogitsProcessor):
    """Applies one :class:`IncrementalBudget` per request that carries a budget."""

    def __init__(self, vllm_config: Any, device: Any, is_pin_memory: bool) -> None:
        super().__init__(vllm_config, device, is_pin_memory)
        self._tokenizer_path = vllm_config.model_config.tokenizer
        self._tokenizer: Any = None
        self._specs: dict[tuple[int, float], BudgetSpec] = {}

    def is_argmax_invariant(self) -> bool:
        return False  # forcing </think> changes the greedy choice

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        budget = (sampling_params.extra_args or {}).get(BUDGET_KEY)
        if budget is not None and (not isinstance(budget, int) or budget < 0):
            raise ValueError(f"{BUDGET_KEY} must be an int >= 0 (got {budget!r})")

    def new_req_logits_processor(self, params: SamplingParams) -> IncrementalBudget | None:
        args = params.extra_args or {}
        budget = args.get(BUDGET_KEY)
        if budget is None:
            return None
        key = (int(budget), float(args.get(GRACE_KEY, 0.1)))
        if key not in self._specs:
            self._specs[key] = BudgetSpec.build(self._tok(), key[0], key[1])
        return IncrementalBudget(self._specs[key], self._decode, args.get(RESUMED_KEY, ()))

    def _tok(self) -> Any:
        if self._tokenizer is None:  # loaded on first use: most runs never set a budget
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self._tokenizer_path)
        return self._tokenizer

    def _decode(self, ids: list[int]) -> str:
        return self._tok().decode(ids, skip_special_tokens=False)
