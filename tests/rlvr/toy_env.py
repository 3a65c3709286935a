"""A toy environment with graded rewards, so a random tiny model's groups carry signal."""

from __future__ import annotations

from posttrain.environments.base import Sample, Score


class VowelEnv:
    name = "vowels"

    def samples(self, split, seed):
        return [Sample(id=f"{split}/{i}", messages=[{"role": "user", "content": f"Say something {i}."}])
                for i in range(8)]

    async def score(self, sample, completion):
        letters = [c for c in completion.lower() if c.isalpha()]
        return Score(sum(c in "aeiou" for c in letters) / len(letters) if letters else 0.0)


class KillerVowelEnv(VowelEnv):
    """Kills the rollout engine the first time it scores: the loop must restart it and go on."""

    killed = False

    async def score(self, sample, completion):
        if not KillerVowelEnv.killed:
            import ray

            KillerVowelEnv.killed = True
            ray.kill(ray.get_actor("rollout-0", namespace="posttrain"), no_restart=True)
        return await super().score(sample, completion)
