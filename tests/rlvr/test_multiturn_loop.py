"""Multi-turn environments in the RL loop: episodes on a real transformers engine are token-exact and
their logprobs equal the trainer's; rl_step mixes them with single-turn prompts; a slow two-step run
through real Ray actors and vLLM."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from posttrain import chat_template
from posttrain.config import EpisodeConfig, GenerationConfig, ModelConfig, RolloutConfig, load_config
from posttrain.environments.base import ScoreKind
from posttrain.orchestration import cluster
from posttrain.rlvr.batch import build_batch
from posttrain.rlvr.config import LossConfig, RLTrainConfig, RLVRConfig
from posttrain.rollout.episodes import Dispatcher, play_jobs, run_episodes
from posttrain.rollout.types import Rollout
from posttrain.training.config import LoraConfig

HERE = Path(__file__).parent
PRESET = HERE.parents[1] / "configs" / "rlvr" / "tiny_smoke.yaml"
GEN = GenerationConfig(max_new_tokens=8, temperature=1.0, enable_thinking=False)


@pytest.fixture(autouse=True)
def toy_envs_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    from posttrain.rollout.engine import RolloutEngine

    eng = RolloutEngine(ModelConfig(name=str(tiny_llama_dir)), RolloutConfig(backend="transformers", max_model_len=1024))
    yield eng
    eng.shutdown()


def recorded_episode(engine, turns=3):
    """One episode of the counter game on the in-process engine, and every (prompt, completion) the engine
    was asked and gave, in order."""
    from multiturn_toy_env import CounterEnv

    calls = []
    generate_ids = engine.generate_ids

    def recording(requests, gen):
        out = generate_ids(requests, gen)
        calls.extend((list(r.prompt_ids), o) for r, o in zip(requests, out))
        return out

    engine.generate_ids = recording
    try:
        env = CounterEnv(turns=turns, size=1)
        result = asyncio.run(run_episodes(env, env.samples("train", 0), 1, Dispatcher.in_process(engine, GEN),
                                          engine.tokenizer, GEN, EpisodeConfig()))[0][0]
    finally:
        del engine.generate_ids
    return result, calls


def test_episode_on_a_real_engine_is_token_exact(engine):
    result, calls = recorded_episode(engine)
    r = result.rollout
    assert result.turns == r.turns == len(calls) == 3 and result.score.kind is ScoreKind.OK
    for t in range(2):
        (prompt, out), (next_prompt, _) = calls[t], calls[t + 1]
        obs = chat_template.continuation_ids(engine.tokenizer, [{"role": "tool", "content": f"count={t + 1}"}],
                                             ended_with_eos=out.token_ids[-1] == 2, enable_thinking=False)
        assert next_prompt == prompt + out.token_ids + obs
    last_prompt, last = calls[-1]
    assert r.prompt_ids == calls[0][0] and r.prompt_ids + r.token_ids == last_prompt + last.token_ids
    starts = [len(p) - len(r.prompt_ids) for p, _ in calls]
    model = [j for (start, (_, out)) in zip(starts, calls) for j in range(start, start + len(out.token_ids))]
    assert [j for j, m in enumerate(r.loss_mask) if m] == model
    assert [r.logprobs[j] for j in model] == [x for _, out in calls for x in out.logprobs]


def test_generate_ids_keeps_each_request_s_max_tokens_and_counts_reasoning(engine):
    from posttrain.rollout.types import TokenRequest

    text = chat_template.render(engine.tokenizer, [{"role": "user", "content": "Hi."}], add_generation_prompt=True)
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    gen = GenerationConfig(max_new_tokens=64, temperature=1.0, reasoning_budget=4)
    out = engine.generate_ids([TokenRequest(ids, True, 0, 12), TokenRequest(ids, False, 1, 3)], gen)
    assert len(out[0].token_ids) <= 12 and len(out[1].token_ids) <= 3
    assert 1 <= out[0].reasoning_tokens and out[1].reasoning_tokens == 0


def test_engine_and_trainer_logprobs_agree_on_a_three_turn_episode(engine, tiny_llama_dir):
    from posttrain.rlvr.trainer import PolicyTrainer

    result, _ = recorded_episode(engine)
    r = result.rollout
    assert r.turns == 3 and 0 < r.model_tokens < len(r.token_ids)
    trainer = PolicyTrainer(ModelConfig(name=str(tiny_llama_dir), dtype="float32"),
                            RLTrainConfig(gradient_checkpointing=False), LoraConfig(), LossConfig())
    batch = build_batch([r], torch.ones(1), torch.ones(1), pad_id=0)
    trainer_lp = trainer.logprobs(batch, GEN.temperature)[0, : len(r.token_ids)]
    mask = batch.mask[0, : len(r.token_ids)].bool()
    diff = (trainer_lp - torch.tensor(r.logprobs))[mask].abs()
    assert diff.numel() == r.model_tokens and float(diff.max()) < 1e-4
    assert (batch.rollout_logprobs[0, : len(r.token_ids)][~mask] == 0).all()


def test_observation_tokens_reach_neither_the_loss_nor_the_mismatch_checks():
    from posttrain.rlvr.policy_loss import policy_loss

    logp = torch.full((1, 6), -5.0)
    rollout = logp.clone()
    rollout[0, 2:4] = 0.0  # an episode's observation tokens carry logprob 0 and mask 0
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 1.0]])
    out = policy_loss(logp.clone().requires_grad_(), logp, rollout, torch.ones(1), mask, LossConfig())
    assert out.metrics["mismatch/masked_sequences"] == 0 and out.metrics["mismatch/seq_error_max"] == 1.0
    assert out.metrics["tokens/trained"] == 4 and out.metrics["loss/is_weight_mean"] == 1.0
    unmasked = policy_loss(logp.clone().requires_grad_(), logp, rollout, torch.ones(1), torch.ones(1, 6), LossConfig())
    assert unmasked.metrics["mismatch/masked_sequences"] == 1  # what a mask on observations prevents


class ScriptedEngines:
    """In place of the loop's Engines: single-turn prompts get fixed completions, episodes run on a
    scripted engine through the real Dispatcher."""

    restarts = 0
    model = ModelConfig()

    def __init__(self, tokenizer):
        from multiturn_toy_env import ScriptedEngine

        self.tokenizer, self.scripted = tokenizer, ScriptedEngine(tokenizer)

    def generate(self, prompts, gen, n):
        texts = ["aaa", "bcd", "ea", "xyz"]
        return [[Rollout(prompt_index=p, sample_index=i, prompt_ids=[1, 2], token_ids=[3, 4], logprobs=[-1.0, -1.0],
                         text=texts[i % 4], finish_reason="stop", reasoning=None, answer=texts[i % 4],
                         reasoning_closed=True, reasoning_tokens=0) for i in range(n)] for p in range(len(prompts))]

    def play(self, jobs, gen, n, limits):
        return asyncio.run(play_jobs(jobs, n, Dispatcher([self.scripted]), self.tokenizer, gen, limits))

    def sync(self, probe=None):
        assert probe is not None and probe.model_tokens > 0
        return SimpleNamespace(max_abs_logprob_diff=0.0, seconds=0.0)


class RecordingTrainer:
    def __init__(self):
        self.batches = []

    def train_step(self, batch, temperature):
        self.batches.append(batch)
        return {"tokens/trained": float(batch.num_tokens)}


def config(run_dir: Path, steps: int, *extra: str) -> RLVRConfig:
    return load_config(RLVRConfig, PRESET, [
        f"run_dir={run_dir}", f"run.steps={steps}", "run.prompts_per_step=4",
        'environments=[{name: "multiturn_toy_env:CounterEnv", options: {turns: 2}}, {name: "toy_env:VowelEnv"}]',
        *extra])


def test_rl_step_plays_episodes_next_to_single_turn_prompts(tmp_path, tokenizer):
    from multiturn_toy_env import CounterEnv
    from toy_env import VowelEnv

    from posttrain.rlvr.loop import _make_sampler, rl_step

    cfg = config(tmp_path, 1)
    envs = {"multiturn_toy_env:CounterEnv": CounterEnv(turns=2), "toy_env:VowelEnv": VowelEnv()}
    trainer = RecordingTrainer()
    metrics = rl_step(cfg, 0, _make_sampler(cfg, envs), envs, ScriptedEngines(tokenizer), trainer)
    assert metrics["env/counter/turns_mean"] == 2.0 and metrics["env/counter/steps"] == 2.0
    assert metrics["env/counter/tool_calls"] > 0 and metrics["env/counter/tool_call_errors"] > 0
    assert "env/vowels/reward" in metrics and "env/vowels/turns_mean" not in metrics
    batch = trainer.batches[0]
    episodes = [i for i in range(len(batch)) if batch.input_ids[i, :2].tolist() != [1, 2]]
    assert episodes, "no episode was trained"
    for i in episodes:  # observation tokens are in the row but never in the loss
        assert 0 < batch.mask[i].sum() < (batch.completion_ids[i] != 0).sum()
        assert (batch.rollout_logprobs[i][batch.mask[i] == 0] == 0).all()


@pytest.mark.slow
def test_two_rl_steps_with_a_multiturn_environment_on_ray_and_vllm(tmp_path, tiny_llama_dir):
    from posttrain.rlvr.loop import main

    cfg = config(tmp_path, 2, "episodes.max_episode_tokens=200", "run.eval_every=2", "run.eval_prompts=2")
    try:
        last = main(cfg)
    finally:
        cluster.shutdown_ray()
    assert last["env/counter/turns_mean"] == 2.0 and "env/vowels/reward" in last
    assert last["tokens/trained"] > 0 and last["train/grad_norm"] > 0
    assert 0 <= last["sync/max_abs_logprob_diff"] < 1e-3  # engines hold the trainer's new weights
    assert last["eval/counter/prompts"] == 2 and last["eval/counter/turns_mean"] == 2.0
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 1, 2] and "env/counter/reward" in lines[1]
