"""The RLVR loop end to end on tiny-llama: real Ray actors, real vLLM, checkpoints and resume."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.config import load_config
from posttrain.environments.base import Sample, Score
from posttrain.environments.registry import EnvConfig
from posttrain.errors import ConfigError
from posttrain.orchestration import cluster
from posttrain.rlvr.config import RLVRConfig
from posttrain.rlvr.loop import main
from posttrain.rollout.types import Rollout

HERE = Path(__file__).parent
PRESET = HERE.parents[1] / "configs" / "rlvr" / "tiny_smoke.yaml"


@pytest.fixture(autouse=True)
def toy_env_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    yield
    cluster.shutdown_ray()


def config(run_dir: Path, steps: int) -> RLVRConfig:
    return load_config(RLVRConfig, PRESET, [
        f"run_dir={run_dir}", f"run.steps={steps}", "run.prompts_per_step=2",
        'environments=[{name: "toy_env:VowelEnv"}]'])


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / f"step-{step:08d}" / "model" / "model.safetensors")


def test_two_steps_end_to_end(tmp_path, tiny_llama_dir):
    cfg = config(tmp_path, 2)
    code = EnvConfig(name="code", options={"limit": 8})  # sandboxed: the stage starts sandbox-N actors
    cfg = cfg.model_copy(update={"environments": [*cfg.environments, code]})
    cfg.run.eval_every, cfg.run.eval_prompts = 2, 4
    last = main(cfg)
    assert "env/code/reward" in last and last.get("env/code/errors/infra", 0) == 0
    assert 0 <= last["eval/vowels/reward"] <= 1 and last["eval/vowels/prompts"] == 4
    assert last["tokens/trained"] > 0 and last["train/grad_norm"] > 0
    assert 0 <= last["sync/max_abs_logprob_diff"] < 1e-3  # engines hold the trainer's new weights
    assert last["time/gen_s"] > 0 and last["time/train_s"] > 0 and last["time/score_s"] >= 0
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 1, 2] and "env/vowels/reward" in lines[1]
    assert "eval/vowels/accuracy" in lines[0]  # before training
    assert (tmp_path / "config.yaml").is_file() and list((tmp_path / "tensorboard").iterdir())
    before = torch.load(tmp_path / "checkpoints" / "step-00000001" / "trainer.pt", weights_only=False)
    assert before["optimizer"]["state"]  # the optimizer really stepped


def test_thinking_on_with_a_budget_through_real_actors(tmp_path, tiny_llama_dir):
    """The recipe's RLVR: prompts open <think>, the engines enforce the reasoning budget while they
    generate, only the answer after </think> is scored, and held-out eval measures both modes."""
    cfg = config(tmp_path, 1)
    budget = 6
    cfg.generation.enable_thinking, cfg.generation.reasoning_budget = True, budget
    cfg.run.eval_every, cfg.run.eval_prompts = 1, 4
    last = main(cfg)
    # a random model never closes its reasoning by itself: every rollout reasons and is cut at the budget
    assert 0 < last["rollout/reasoning_tokens_mean"] <= budget * 1.1 + 1
    assert 0 < last["eval/vowels/reasoning_tokens"] <= budget * 1.1 + 1 and last["eval/vowels/reasoning_closed"] == 1.0
    assert "eval/vowels/no_think/accuracy" in last and "eval/vowels/no_think/reasoning_tokens" not in last
    assert last["sync/max_abs_logprob_diff"] < 1e-3  # budget-forced tokens are scored like sampled ones


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(tmp_path, tiny_llama_dir):
    main(config(tmp_path / "straight", 2))
    main(config(tmp_path / "resumed", 1))
    main(config(tmp_path / "resumed", 2), resume=True)
    a, b = weights(tmp_path / "straight", 2), weights(tmp_path / "resumed", 2)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    steps = [json.loads(x)["step"] for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # no step lost or repeated


def test_direct_weight_sync_over_gloo(tmp_path, tiny_llama_dir):
    """rollout.sync_transport=gloo through real actors: the trainer actor broadcasts into the engine actor
    (vLLM's weight-transfer handshake, layerwise reload); nothing is staged, and after each step the engine
    holds the trainer's weights."""
    cfg = config(tmp_path, 2)
    (tmp_path / "staged").mkdir()
    cfg.rollout.sync_transport, cfg.rollout.sync_dir = "gloo", str(tmp_path / "staged")
    last = main(cfg)
    assert last["tokens/trained"] > 0 and 0 <= last["sync/max_abs_logprob_diff"] < 1e-3
    assert not list((tmp_path / "staged").iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["shm", "gloo"])  # gloo: the new engines meet the trainer again
def test_dead_rollout_engine_is_restarted(tmp_path, tiny_llama_dir, monkeypatch, transport):
    import toy_env

    monkeypatch.setattr(toy_env.KillerVowelEnv, "killed", False)
    cfg = config(tmp_path, 2)
    cfg.environments[0].name = "toy_env:KillerVowelEnv"
    cfg.rollout.sync_transport = transport
    last = main(cfg)
    assert last["rollout/engine_restarts"] == 1
    assert last["tokens/trained"] > 0 and 0 <= last["sync/max_abs_logprob_diff"] < 1e-3
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_existing_run_needs_resume(tmp_path):
    (tmp_path / "checkpoints" / "step-00000001").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-00000001" / "state.json").write_text('{"step": 1}')
    with pytest.raises(ConfigError, match="pass --resume"):
        main(config(tmp_path, 2))


class SlowJudgeEnv:
    """A group environment (as a GenRM is) whose judge takes 5 s per step."""

    name = "slow_judge"

    def samples(self, split, seed):
        return [Sample(f"{split}/0", [{"role": "user", "content": "hi"}])]

    async def score(self, sample, completion):
        return Score(1.0)

    async def score_groups(self, samples, groups):
        await asyncio.sleep(5)
        return [[Score(1.0) for _ in group] for group in groups]


class OneRolloutPerSample:
    """In place of the rollout engines: every prompt gets n identical one-token rollouts."""

    def generate(self, prompts, gen, n):
        return [[Rollout(prompt_index=p, sample_index=i, prompt_ids=[1], token_ids=[2], logprobs=[0.0], text="a",
                         finish_reason="stop", reasoning=None, answer="a", reasoning_closed=True, reasoning_tokens=0)
                 for i in range(n)] for p in range(len(prompts))]

    def sync(self, probe=None):
        raise AssertionError("nothing was trained: no sync")

    restarts = 0


def test_the_judge_deadline_is_timeouts_judge_s(tmp_path):
    """A group environment gets timeouts.judge_s for a step (not rollout.call_timeout_s): past it,
    the step's rollouts get reward 0 and kind env_error, and nothing is trained."""
    from posttrain.rlvr.loop import _make_sampler, rl_step

    cfg = config(tmp_path, 1).model_copy(update={"environments": [EnvConfig(name="slow_judge")]})
    cfg.timeouts.judge_s = 0.2
    assert cfg.rollout.call_timeout_s > 5
    envs = {"slow_judge": SlowJudgeEnv()}
    metrics = rl_step(cfg, 0, _make_sampler(cfg, envs), envs, OneRolloutPerSample(), trainer=None)
    assert metrics["env/slow_judge/errors/env_error"] == cfg.run.prompts_per_step * cfg.rollout.samples_per_prompt
    assert metrics["reward/mean"] == 0.0 and metrics["train/skipped_updates"] == 1.0



class AllSolvedEnv(SlowJudgeEnv):
    """Every rollout solves its prompt: every group's rewards are equal."""

    async def score_groups(self, samples, groups):
        return [[Score(1.0) for _ in group] for group in groups]


def test_a_step_that_trains_nothing_says_why(tmp_path, caplog):
    from posttrain.rlvr.loop import _make_sampler, rl_step

    cfg = config(tmp_path, 1).model_copy(update={"environments": [EnvConfig(name="solved")]})
    envs = {"solved": AllSolvedEnv()}
    with caplog.at_level("WARNING", logger="posttrain.rlvr.loop"):
        metrics = rl_step(cfg, 0, _make_sampler(cfg, envs), envs, OneRolloutPerSample(), trainer=None)
    assert metrics["train/skipped_updates"] == 1.0
    groups = cfg.run.prompts_per_step
    assert f"step 1 trains nothing: every group's rewards were equal ({groups} of {groups} groups all solved" in caplog.text


def test_run_progress_follows_the_clock_when_time_caps_the_run(tmp_path):
    """steps: 1000, max_minutes: 8 -- after 4 minutes and 30 steps the run is half done, not 3% done."""
    from posttrain.rlvr.loop import run_progress

    cfg = config(tmp_path, 1000)
    cfg.run.max_minutes = 8
    assert run_progress(cfg, 30, 4 * 60) == 0.5
    assert run_progress(cfg, 30, 20 * 60) == 1.0
    cfg.run.max_minutes = None
    assert run_progress(cfg, 30, 4 * 60) == 0.03


class KindEnv:
    """Scores in turn: a right answer; an answer problem whose detail text starts with 'infra'
    (a plug-in's wording, kind invalid); an infra failure (kind infra)."""

    name = "kinds"

    def __init__(self):
        self.calls = 0

    def samples(self, split, seed):
        return [Sample(f"{split}/0", [{"role": "user", "content": "hi"}])]

    async def score(self, sample, completion):
        from posttrain.environments.base import ScoreKind

        self.calls += 1
        return [Score(1.0), Score(0.0, error="infra-red answer: no number in it"),
                Score(0.0, error="checker down", kind=ScoreKind.INFRA)][(self.calls - 1) % 3]


class RecordingTrainer:
    def __init__(self):
        self.trained = 0

    def train_step(self, batch, temperature):
        self.trained += len(batch.advantages)
        return {"tokens/trained": 1.0}


class SyncingRollouts(OneRolloutPerSample):
    def sync(self, probe=None):
        from types import SimpleNamespace

        return SimpleNamespace(max_abs_logprob_diff=0.0, seconds=0.0)


def test_what_is_trained_is_decided_by_the_kind(tmp_path):
    """Infra scores are not trained, whatever their text; an answer problem is, whatever its text."""
    from posttrain.rlvr.loop import _make_sampler, rl_step

    cfg = config(tmp_path, 1).model_copy(update={"environments": [EnvConfig(name="kinds")]})
    envs, trainer = {"kinds": KindEnv()}, RecordingTrainer()
    metrics = rl_step(cfg, 0, _make_sampler(cfg, envs), envs, SyncingRollouts(), trainer)
    n = cfg.run.prompts_per_step * cfg.rollout.samples_per_prompt  # 8: kinds ok, invalid, infra, ok, ...
    infra = len(range(2, n, 3))
    assert metrics["env/kinds/errors/infra"] == infra and metrics["env/kinds/errors/invalid"] == n - infra - (n + 2) // 3
    assert trainer.trained == n - infra and metrics["rollout/kept_fraction"] == (n - infra) / n


def test_the_starting_eval_is_not_repeated_when_step_0_holds_it(tmp_path):
    """A run resumed before its first checkpoint, or one the pipeline handed the previous stage's final
    eval: step 0 already measures every environment. Another metric at step 0 does not count."""
    from posttrain.metrics import MetricsLogger
    from posttrain.rlvr.loop import starting_policy_measured

    envs = {"math": object(), "code": object()}
    logger = MetricsLogger(str(tmp_path), stage="rlvr")
    logger.log(0, {"eval/math/accuracy": 0.3, "eval/genrm_judge/pairwise_accuracy": 0.6})
    logger.close()
    assert not starting_policy_measured(str(tmp_path), envs)  # code not measured yet
    logger = MetricsLogger(str(tmp_path), stage="rlvr")
    logger.log(0, {"eval/code/accuracy": 0.1})
    logger.close()
    assert starting_policy_measured(str(tmp_path), envs)
    assert not starting_policy_measured(str(tmp_path / "fresh"), envs)


def test_a_step_writes_its_samples_as_text(tmp_path):
    """run.log_samples rows of the step go to samples.jsonl and TensorBoard text; 0 writes none."""
    from posttrain.rlvr.loop import _make_sampler, rl_step
    from posttrain.samples_log import SampleLog, read_rows

    cfg = config(tmp_path, 1).model_copy(update={"environments": [EnvConfig(name="solved")]})
    envs = {"solved": AllSolvedEnv()}
    texts = []
    rl_step(cfg, 4, _make_sampler(cfg, envs), envs, OneRolloutPerSample(), trainer=None,
            samples=SampleLog(tmp_path, 3, lambda *a: texts.append(a)))
    rows = read_rows(tmp_path)
    assert len(rows) == 2  # two groups of equal rewards: one row each
    assert all((r["step"], r["env"], r["prompt"], r["completion"], r["reward"]) == (5, "solved", "hi", "a", 1.0)
               for r in rows)
    assert texts and texts[0][:2] == (5, "samples") and "hi" in texts[0][2]
    rl_step(cfg, 5, _make_sampler(cfg, envs), envs, OneRolloutPerSample(), trainer=None,
            samples=SampleLog(tmp_path, 0, lambda *a: texts.append(a)))
    assert len(read_rows(tmp_path)) == 2 and len(texts) == 1


class QuarterInformativeEnv:
    """Rollout 'a' solves prompts whose number is a multiple of 4, nothing solves the others: one
    prompt in four gives a group whose rewards differ (with rollouts alternating 'a', 'b')."""

    name = "quarter"

    def samples(self, split, seed):
        return [Sample(f"{split}/{i}", [{"role": "user", "content": str(i)}]) for i in range(64)]

    async def score(self, sample, completion):
        return Score(float(int(sample.id.rsplit("/", 1)[1]) % 4 == 0 and completion == "a"))


class AlternatingRollouts(SyncingRollouts):
    def __init__(self):
        self.calls = []

    def generate(self, prompts, gen, n):
        self.calls.append((len(prompts), gen.seed))
        return [[Rollout(prompt_index=p, sample_index=i, prompt_ids=[1], token_ids=[2], logprobs=[0.0],
                         text="ab"[i % 2], finish_reason="stop", reasoning=None, answer="ab"[i % 2],
                         reasoning_closed=True, reasoning_tokens=0) for i in range(n)] for p in range(len(prompts))]


@pytest.mark.parametrize("refill_rounds", [0, 3])
def test_refill_rounds_draw_more_prompts_until_the_step_has_informative_groups(tmp_path, refill_rounds):
    from posttrain.rlvr.loop import _make_sampler, rl_step

    cfg = config(tmp_path, 1).model_copy(update={"environments": [EnvConfig(name="quarter")]})
    cfg.run.prompts_per_step, cfg.run.refill_rounds, cfg.rollout.samples_per_prompt = 4, refill_rounds, 2
    envs, trainer, engines = {"quarter": QuarterInformativeEnv()}, RecordingTrainer(), AlternatingRollouts()
    sampler = _make_sampler(cfg, envs)
    metrics = rl_step(cfg, 0, sampler, envs, engines, trainer)
    rounds = int(metrics["rollout/rounds"])
    assert rounds > 1 or refill_rounds == 0  # this seed draws too few informative prompts at first
    assert len(engines.calls) == rounds and all(size == 4 for size, _ in engines.calls)
    assert len({seed for _, seed in engines.calls}) == rounds  # every round samples afresh
    informative = 4 * rounds - metrics["rollout/zero_variance_groups"]
    if refill_rounds == 0:
        assert rounds == 1
    else:  # it stopped as soon as 4 groups differed, or after 1 + 3 rounds
        assert 1 <= rounds <= 4 and (informative >= 4 or rounds == 4)
    assert trainer.trained == 2 * min(informative, 4)  # at most prompts_per_step groups train


def test_informative_and_first_groups():
    from posttrain.rlvr.loop import first_groups, informative_groups

    scores = [Score(r) for r in (1, 1, 0, 1, 0, 0, 1, 0)]
    assert informative_groups(scores, 2) == 2
    keep = torch.tensor([True, True, False, False, True, True, True, True])
    assert first_groups(keep, 2, 2).tolist() == [True, True, False, False, True, True, False, False]


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("k", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_async_rollouts_carry_their_version_and_lag_at_most_k(tmp_path, tiny_llama_dir, k):
    """run.max_staleness=k through real actors: the engines generate ahead while the trainer trains;
    every trained rollout's weights are at most k updates old (by its oldest tokens: k=1 also cuts
    generations into 4-token segments, so syncs land inside them), and the engines still hold the
    trainer's weights after each sync."""
    cfg = config(tmp_path, 4)
    cfg.run.max_staleness, cfg.run.segment_tokens = k, 4 if k == 1 else 0
    last = main(cfg)
    logged = rows(tmp_path)
    assert [x["step"] for x in logged] == [1, 2, 3, 4]
    for row in logged:
        assert 0 <= row["async/staleness_mean"] <= row["async/staleness_max"] <= k
        assert sum(row[f"async/staleness_{lag}"] for lag in range(k + 1)) == pytest.approx(1.0)
        assert 0.0 <= row["async/trainer_idle_share"] <= 1.0 and 0.0 <= row["async/engine_idle_share"] <= 1.0
        assert 0.0 <= row["async/spanning_share"] <= 1.0
    assert logged[0]["async/staleness_max"] == 0  # the first step is sampled by the starting weights
    assert any(row["async/staleness_max"] >= 1 for row in logged[1:])  # later ones while the trainer trained
    assert last["tokens/trained"] > 0 and 0 <= last["sync/max_abs_logprob_diff"] < 1e-3
    assert (tmp_path / "model" / "config.json").is_file()


@pytest.mark.slow
def test_async_resume_with_rollouts_in_flight_trains_no_step_twice(tmp_path, tiny_llama_dir, monkeypatch):
    from posttrain.rlvr import loop

    cfg = config(tmp_path, 4)
    cfg.run.max_staleness, cfg.run.save_every = 1, 2
    real = loop.learn

    def dies_at_step_3(cfg_, step, *args, **kwargs):
        if step == 2:  # step 4's rollouts are being produced meanwhile
            raise RuntimeError("controller killed")
        return real(cfg_, step, *args, **kwargs)

    monkeypatch.setattr(loop, "learn", dies_at_step_3)
    with pytest.raises(RuntimeError, match="controller killed"):
        main(cfg)
    monkeypatch.setattr(loop, "learn", real)
    main(cfg, resume=True)
    assert [x["step"] for x in rows(tmp_path)] == [1, 2, 3, 4]  # the lost in-flight rollouts counted nowhere


@pytest.mark.slow
def test_async_dead_rollout_engine_is_restarted(tmp_path, tiny_llama_dir, monkeypatch):
    import toy_env

    monkeypatch.setattr(toy_env.KillerVowelEnv, "killed", False)
    cfg = config(tmp_path, 3)
    cfg.run.max_staleness = 1
    cfg.environments[0].name = "toy_env:KillerVowelEnv"
    last = main(cfg)
    assert last["rollout/engine_restarts"] == 1
    assert last["tokens/trained"] > 0 and 0 <= last["sync/max_abs_logprob_diff"] < 1e-3
    assert [x["step"] for x in rows(tmp_path)] == [1, 2, 3]


class TurnTakingEngines(OneRolloutPerSample):
    """Fake engines that log what the loop asks of them, for the colocated turn order."""

    def __init__(self, calls):
        self.calls = calls

    def generate(self, prompts, gen, n):
        self.calls.append("generate")
        groups = super().generate(prompts, gen, n)
        for group in groups:
            for r in group:  # differing answers: the vowel env's rewards differ within each group
                r.text = r.answer = "a" * r.sample_index + "b"
        return groups

    def sleep(self):
        self.calls.append("sleep")
        return 0.1

    def wake(self):
        self.calls.append("wake")
        return 0.2

    def sync(self, probe=None):
        self.calls.append("sync")
        return None


class TurnTrainer:
    def __init__(self, calls):
        self.calls = calls

    def train_step(self, batch, temperature):
        self.calls.append("train")
        return {"tokens/trained": float(batch.num_tokens)}

    def load_optimizer(self):
        self.calls.append("load_optimizer")

    def offload_optimizer(self):
        self.calls.append("offload_optimizer")


@pytest.mark.parametrize("offload", [False, True])
def test_colocated_engines_sleep_while_the_trainer_trains(tmp_path, offload):
    """run.colocate: generate, engines sleep, (optimizer back), train, (optimizer out), engines wake,
    then the weight sync -- the order that lets trainer and engines share a GPU."""
    from posttrain.rlvr.loop import _make_sampler, rl_step

    cfg = config(tmp_path, 1)
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"colocate": True}),
                                 "train": cfg.train.model_copy(update={"offload_optimizer": offload, "num_gpus": 0.5}),
                                 "rollout": cfg.rollout.model_copy(update={"gpus_per_engine": 0.5})})
    import toy_env

    envs = {"toy_env:VowelEnv": toy_env.VowelEnv()}
    calls: list[str] = []
    metrics = rl_step(cfg, 0, _make_sampler(cfg, envs), envs, TurnTakingEngines(calls), TurnTrainer(calls))
    middle = ["load_optimizer", "train", "offload_optimizer"] if offload else ["train"]
    assert calls == ["generate", "sleep", *middle, "wake", "sync"]
    assert (metrics["colocate/sleep_s"], metrics["colocate/wake_s"]) == (0.1, 0.2)
