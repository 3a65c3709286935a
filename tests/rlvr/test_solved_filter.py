"""The solved-prompt filter: the starting policy's always-solved prompts leave the pool, the measured
pass rates seed the curriculum, and a resumed run draws from the same pool."""

from __future__ import annotations

from pathlib import Path

from posttrain.config import load_config
from posttrain.environments.base import Sample, Score
from posttrain.environments.mixing import CurriculumConfig, EnvSampler, MixedSampler
from posttrain.rlvr.config import RLVRConfig
from posttrain.rlvr.solved_filter import drop_solved
from posttrain.rollout.types import Rollout

PRESET = Path(__file__).parents[2] / "configs" / "rlvr" / "tiny_smoke.yaml"


class ParityEnv:
    """Prompt i is always solved when i is even, solved in one sample of every k when odd."""

    name = "parity"

    def samples(self, split, seed):
        return [Sample(f"p{i}", [{"role": "user", "content": str(i)}]) for i in range(10)]

    async def score(self, sample, completion):
        i, j = int(sample.id[1:]), int(completion)
        return Score(1.0 if i % 2 == 0 or j == 0 else 0.0)


class Engines:
    """Rollout j of every prompt answers "j"; records what it was asked."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, gen, n):
        self.calls.append((len(prompts), n))
        return [[Rollout(p, j, [1], [2], [0.0], str(j), "stop", None, str(j), True, 0) for j in range(n)]
                for p in range(len(prompts))]


def sampler(curriculum: bool = True) -> MixedSampler:
    env_sampler = EnvSampler(ParityEnv().samples("train", 0), CurriculumConfig(enabled=curriculum), seed=0)
    return MixedSampler({"parity": env_sampler}, {"parity": 1.0})


def config(tmp_path, **filter_options) -> RLVRConfig:
    options = [f"run.solved_filter.{k}={v}" for k, v in filter_options.items()]
    return load_config(RLVRConfig, PRESET, [f"run_dir={tmp_path}", "run.solved_filter.enabled=true", *options])


def test_always_solved_prompts_leave_the_pool(tmp_path):
    cfg, mixed, engines = config(tmp_path, samples=3), sampler(), Engines()
    metrics = drop_solved(cfg, mixed, {"parity": ParityEnv()}, engines)
    assert engines.calls == [(10, 3)]
    env_sampler = mixed.samplers["parity"]
    assert sorted(s.id for s in env_sampler.samples) == ["p1", "p3", "p5", "p7", "p9"]
    assert metrics["filter/parity/dropped"] == 5 and metrics["filter/parity/kept"] == 5
    assert env_sampler.pass_rate["p1"] == 1 / 3 and env_sampler.pass_rate["p0"] == 1.0  # the curriculum's start
    assert {s.id for _, s in mixed.next_batch(40)} <= {"p1", "p3", "p5", "p7", "p9"}


def test_only_a_subset_is_measured_and_the_rest_stays(tmp_path):
    cfg, mixed = config(tmp_path, max_prompts=4), sampler()
    metrics = drop_solved(cfg, mixed, {"parity": ParityEnv()}, Engines())
    assert metrics["filter/parity/measured"] == 4
    assert metrics["filter/parity/kept"] == 10 - metrics["filter/parity/dropped"]
    assert len(mixed.samplers["parity"].samples) > 5  # unmeasured even prompts are kept


def test_a_resumed_sampler_draws_from_the_filtered_pool(tmp_path):
    mixed = sampler(curriculum=False)
    drop_solved(config(tmp_path), mixed, {"parity": ParityEnv()}, Engines())
    mixed.next_batch(3)
    state = mixed.state_dict()
    expected = [[s.id for _, s in mixed.next_batch(4)] for _ in range(3)]
    resumed = sampler(curriculum=False)  # rebuilt from the environment's whole training split
    resumed.load_state_dict(state)
    assert [[s.id for _, s in resumed.next_batch(4)] for _ in range(3)] == expected


def test_everything_solved_keeps_the_pool(tmp_path, caplog):
    class Easy(ParityEnv):
        async def score(self, sample, completion):
            return Score(1.0)

    mixed = sampler()
    with caplog.at_level("WARNING"):
        metrics = drop_solved(config(tmp_path), mixed, {"parity": Easy()}, Engines())
    assert metrics["filter/parity/dropped"] == 0 and len(mixed.samplers["parity"].samples) == 10
    assert "solves all 10 measured prompts" in caplog.text
