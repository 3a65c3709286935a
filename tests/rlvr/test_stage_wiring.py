"""The stage's wiring, with stand-ins for its Ray actors (no Ray, no vLLM): environments are
started with the stage's resources and closed when it ends, also on error; code is scored on
the stage's sandbox pool with the configured limits, in held-out evaluation as in training."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from posttrain.config import load_config
from posttrain.environments.registry import EnvConfig
from posttrain.rlvr import loop
from posttrain.rlvr.config import RLVRConfig
from posttrain.rollout.types import Rollout
from posttrain.verifiers.code import CodeResult

PRESET = Path(__file__).parents[2] / "configs" / "rlvr" / "tiny_smoke.yaml"


class FakePlacement:
    def __init__(self, stage, roles, strategy="PACK"):
        self.roles = roles

    def slot(self, role, i=0):
        return SimpleNamespace(scheduling_strategy=lambda: None)

    def remove(self):
        pass


class FakeTrainer:
    def __init__(self, cfg, placement=None):
        pass

    def resume(self, run_dir):
        return None

    def train_step(self, batch, temperature):
        return {"tokens/trained": 1.0}

    def save(self, run_dir, step, extra, keep_last):
        return f"{run_dir}/checkpoints/step-{step}"

    def export(self, folder):
        return folder

    def shutdown(self):
        pass


class FakeEngines:
    """Greedy (evaluation) and sampled (training) answers are told apart by a comment in the program."""

    restarts = 0
    fail_at_step = None  # raise on this training step's generation (a failure in the middle of a stage)

    def __init__(self, model, cfg, trainer, placement=None):
        self.steps = 0

    def generate(self, prompts, gen, n):
        if gen.temperature > 0:
            self.steps += 1
            if self.steps == FakeEngines.fail_at_step:
                raise RuntimeError("rollout-0 died mid-stage")
        tag = "# eval" if gen.temperature == 0 else "# train"
        answer = f"```python\ndef f():\n    return 1  {tag}\n```\n\\boxed{{{len(prompts)}}}"
        return [[Rollout(p, i, [1], [2, 3][: 1 + i % 2], [0.0] * (1 + i % 2), answer, "stop", None, answer, True, 0)
                 for i in range(n)] for p in range(len(prompts))]

    def sync(self, probe=None):
        return SimpleNamespace(max_abs_logprob_diff=0.0, seconds=0.0)

    def shutdown(self):
        pass


class FakePool:
    """The stage's sandbox-N actors: records each job with the limits the pool was built with."""

    calls: list[tuple[float, str]] = []

    def __init__(self, num_workers, limits, call_timeout_s=60.0, num_cpus_per_worker=1.0, placement=None):
        self.limits = limits

    async def arun(self, job):
        FakePool.calls.append((self.limits.wall_s, job.completion))
        return CodeResult(False, "wrong_answer", 0.01)

    def shutdown(self):
        pass


@pytest.fixture
def stage(monkeypatch):
    """The real loop and StageActors; stand-ins for placement, trainer, engines and sandbox pool."""
    import posttrain.verifiers.pool as pool_module
    from posttrain.rlvr import actors

    monkeypatch.setattr(loop.cluster, "init_ray", lambda **kw: None)
    monkeypatch.setattr(actors, "StagePlacement", FakePlacement)
    monkeypatch.setattr(actors, "TrainerGroup", FakeTrainer)
    monkeypatch.setattr(actors, "Engines", FakeEngines)
    monkeypatch.setattr(pool_module, "VerifierPool", FakePool)
    monkeypatch.setattr(FakeEngines, "fail_at_step", None)
    FakePool.calls = []
    return FakePool


def config(tmp_path, *envs: EnvConfig) -> RLVRConfig:
    cfg = load_config(RLVRConfig, PRESET, [f"run_dir={tmp_path}", "run.steps=2", "run.prompts_per_step=2",
                                            "run.eval_every=1", "run.eval_prompts=2", "sandbox.wall_s=7.5"])
    return cfg.model_copy(update={"environments": list(envs)})


def test_evaluation_scores_code_on_the_stage_sandbox_pool_with_its_limits(tmp_path, stage):
    loop.main(config(tmp_path, EnvConfig(name="code", options={"limit": 8})))
    evals = [c for c in stage.calls if "# eval" in c[1]]
    trains = [c for c in stage.calls if "# train" in c[1]]
    assert len(evals) == 3 * 2  # before training and after each of 2 steps, 2 prompts each
    assert trains and {wall for wall, _ in stage.calls} == {7.5}  # sandbox.wall_s reached the Limits used


def test_a_stage_that_fails_midway_leaves_no_math_checker(tmp_path, stage, math_checkers):
    FakeEngines.fail_at_step = 2
    with pytest.raises(RuntimeError, match="mid-stage"):
        loop.main(config(tmp_path, EnvConfig(name="math", options={"size": 8, "workers": 2}),
                         EnvConfig(name="code", options={"limit": 8})))
    assert math_checkers() == []


def test_a_finished_stage_leaves_no_math_checker(tmp_path, stage, math_checkers):
    loop.main(config(tmp_path, EnvConfig(name="math", options={"size": 8, "workers": 2})))
    assert math_checkers() == []
