"""`reasoning_gym`: any procedural task of the reasoning-gym package, scored by its own checker.

Hundreds of tasks for free (``reasoning_gym.factory.DATASETS``): arithmetic, logic, puzzles,
graphs... Each task generates its items from a seed (offline) and scores an answer with its
own ``score_answer``, which returns partial credit in [0, 1] for some tasks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from posttrain.environments.base import DefaultHooks, Sample, Score, user_prompt

INSTRUCTION = "Reason step by step if needed, then give only the final answer, with no extra words."


class ReasoningGymEnv(DefaultHooks):
    """Procedurally generated reasoning tasks from reasoning-gym, scored by its own verifiers.

    Options:
        tasks: task names, or name -> that task's reasoning-gym config
        size: train samples per task
        test_size: held-out samples per task
        system: system prompt added to every sample (None = none)
    """

    name = "reasoning_gym"

    def __init__(self, tasks: Sequence[str] | Mapping[str, Mapping[str, Any]] = ("basic_arithmetic",),
                 size: int = 200, test_size: int = 50, system: str | None = None) -> None:
        import reasoning_gym

        known = set(reasoning_gym.factory.DATASETS)
        configs = dict(tasks) if isinstance(tasks, Mapping) else {t: {} for t in tasks}
        unknown = sorted(set(configs) - known)
        if not configs or unknown:
            raise ValueError(f"unknown reasoning-gym task(s) {unknown or '(none given)'}; "
                             f"e.g. {', '.join(sorted(known)[:8])}, ... ({len(known)} in all)")
        if size < 1 or test_size < 1:
            raise ValueError(f"size and test_size must be >= 1 (got {size}, {test_size})")
        self.configs = {k: dict(v or {}) for k, v in configs.items()}
        self.sizes = {"train": size, "test": test_size}
        self.system = system
        self._datasets: dict[tuple[str, str, int], Any] = {}

    def _dataset(self, task: str, split: str, seed: int) -> Any:
        import reasoning_gym

        key = (task, split, seed)
        if key not in self._datasets:
            # train and test come from disjoint seeds
            split_seed = seed * 2 + (split == "test")
            self._datasets[key] = reasoning_gym.create_dataset(
                task, size=self.sizes[split], seed=split_seed, **self.configs[task])
        return self._datasets[key]

    def samples(self, split: str, seed: int) -> list[Sample]:
        if split not in self.sizes:
            raise ValueError(f"split must be 'train' or 'test' (got {split!r})")
        out = []
        for task in self.configs:
            ds = self._dataset(task, split, seed)
            for i, entry in enumerate(ds):
                out.append(Sample(
                    id=f"{task}/{split}/{seed}/{i}",
                    messages=user_prompt(f"{entry['question']}\n\n{INSTRUCTION}", self.system),
                    answer=str(entry["answer"]),
                    info={"task": task, "split": split, "seed": seed, "index": i},
                ))
        return out

    async def score(self, sample: Sample, completion: str) -> Score:
        info = sample.info
        ds = self._dataset(info["task"], info["split"], info["seed"])
        entry = ds[info["index"]]
        reward = await asyncio.to_thread(ds.score_answer, answer=completion.strip(), entry=entry)
        return Score(float(reward or 0.0))
