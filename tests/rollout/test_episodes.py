"""Token-exact multi-turn episodes (``posttrain.rollout.episodes``) with scripted engines: what the
engine is asked at every turn, masks, limits, hostile environments, interleaving, seeds."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
import torch

from posttrain import chat_template
from posttrain.config import EpisodeConfig, GenerationConfig
from posttrain.environments.base import ScoreKind
from posttrain.rlvr.batch import build_batch
from posttrain.rollout.episodes import TURN_STRIDE, Dispatcher, EpisodeJob, run_episodes
from posttrain.rollout.types import RolloutError

sys.path.insert(0, str(Path(__file__).parents[1] / "rlvr"))
from multiturn_toy_env import CounterEnv, HostileEnv, ScriptedEngine  # noqa: E402

GEN = GenerationConfig(max_new_tokens=32, temperature=1.0, enable_thinking=False)
LIMITS = EpisodeConfig(max_turns=8, max_episode_tokens=1024, step_timeout_s=5.0)


def play(env, tokenizer, engine, n=2, limits=LIMITS, samples=None, engines=1, gen=GEN):
    samples = samples if samples is not None else env.samples("train", 0)
    generate = Dispatcher([engine] * engines)
    return asyncio.run(run_episodes(env, samples, n, generate, tokenizer, gen, limits)), generate


class SnapshotEnv(CounterEnv):
    """Keeps what the episode's messages were at every step."""

    def __init__(self) -> None:
        super().__init__(turns=3, size=1, role="user")
        self.seen: list[list[dict]] = []

    async def step(self, episode, turn):
        self.seen.append([dict(m) for m in episode.messages])
        return await super().step(episode, turn)


def test_the_environment_sees_the_conversation_as_messages(tokenizer):
    env = SnapshotEnv()
    results, _ = play(env, tokenizer, ScriptedEngine(tokenizer), n=1)
    assert [[m["role"] for m in seen] for seen in env.seen] == [
        ["user", "assistant"], ["user", "assistant", "user", "assistant"],
        ["user", "assistant", "user", "assistant", "user", "assistant"]]
    assert env.seen[2][2]["content"] == "count=1" and env.seen[2][4]["content"] == "count=2"
    calls = [m for seen in env.seen for m in seen[-1:] if m.get("tool_calls")]
    assert calls and calls[0]["tool_calls"] == [{"name": "count", "arguments": {}}]
    assert results[0][0].tool_calls == len(calls)


@pytest.mark.parametrize("close_turns, thinking", [(True, False), (False, False), (True, True)])
def test_each_turn_prompt_is_the_last_prompt_plus_generated_plus_observation_ids(tokenizer, close_turns, thinking):
    env, engine = CounterEnv(turns=3, size=2), ScriptedEngine(tokenizer, close_turns)
    gen = GEN.model_copy(update={"enable_thinking": thinking})
    results, _ = play(env, tokenizer, engine, gen=gen)
    assert len(engine.requests) == 2 * 2 * 3
    for group in results:
        for e in group:
            r = e.rollout
            asked = sorted((q for q in engine.requests if q.index // TURN_STRIDE == r.prompt_index * 2 + r.sample_index),
                           key=lambda q: q.index)
            assert [q.index % TURN_STRIDE for q in asked] == [0, 1, 2] and e.turns == r.turns == 3
            first = chat_template.render(tokenizer, env.samples("train", 0)[r.prompt_index].messages,
                                         add_generation_prompt=True, enable_thinking=thinking, tools=env.tools)
            assert asked[0].prompt_ids == r.prompt_ids == tokenizer.encode(first, add_special_tokens=False)
            for t in range(2):  # turn t+1 = turn t's prompt + its completion + the tool answer's ids
                out = engine.complete(asked[t])
                obs = chat_template.continuation_ids(tokenizer, [{"role": "tool", "content": f"count={t + 1}"}],
                                                     ended_with_eos=out.token_ids[-1] == engine.end,
                                                     enable_thinking=thinking)
                assert asked[t + 1].prompt_ids == asked[t].prompt_ids + out.token_ids + obs
            last = engine.complete(asked[2])
            assert r.prompt_ids + r.token_ids == asked[2].prompt_ids + last.token_ids  # what the trainer sees
            model = [i for i, m in enumerate(r.loss_mask) if m]
            assert len(model) == sum(len(engine.complete(q).token_ids) for q in asked) == r.model_tokens
            assert all(r.logprobs[i] == 0.0 for i, m in enumerate(r.loss_mask) if not m)
            assert all(q.thinking == thinking for q in asked) and (r.reasoning is not None) == thinking
            assert e.score.kind is ScoreKind.OK and r.finish_reason == last.finish_reason
            assert close_turns or r.finish_reason == "length"


def test_the_batch_trains_model_tokens_only(tokenizer):
    results, _ = play(CounterEnv(turns=3, size=2), tokenizer, ScriptedEngine(tokenizer))
    rollouts = [e.rollout for group in results for e in group]
    batch = build_batch(rollouts, torch.ones(len(rollouts)), torch.ones(len(rollouts)), pad_id=0)
    for i, r in enumerate(rollouts):
        c = len(r.token_ids)
        assert batch.input_ids[i, : len(r.prompt_ids) + c].tolist() == r.prompt_ids + r.token_ids
        assert batch.mask[i, :c].tolist() == [float(m) for m in r.loss_mask] and batch.mask[i, c:].sum() == 0
        assert batch.rollout_logprobs[i, :c].tolist() == pytest.approx(r.logprobs)
        assert 0 < batch.mask[i].sum() < c  # observations are in the row, not in the loss
    assert batch.num_tokens == sum(r.model_tokens for r in rollouts)
    dropped = build_batch(rollouts, torch.ones(len(rollouts)), torch.zeros(len(rollouts)), pad_id=0)
    assert dropped.num_tokens == 0


def test_a_turns_forced_closing_tag_does_not_train(tokenizer):
    """Tokens the engine forced (the reasoning budget's closing tag) carry mask 0 like observations."""

    class Forcing(ScriptedEngine):
        def complete(self, r):
            out = super().complete(r)
            out.forced = (0,)  # as generate_ids reports a forced first token
            return out

    engine = Forcing(tokenizer)
    r = play(CounterEnv(turns=3, size=1), tokenizer, engine, n=1)[0][0][0].rollout
    generated = sum(len(engine.complete(q).token_ids) for q in engine.requests)
    assert r.turns == 3 and sum(r.loss_mask) == r.model_tokens == generated - 3


def test_samples_do_not_depend_on_batching_or_concurrency(tokenizer):
    env = CounterEnv(turns=3, size=4)
    a, _ = play(env, tokenizer, ScriptedEngine(tokenizer), n=3)
    b, generate = play(env, tokenizer, ScriptedEngine(tokenizer), n=3, engines=3,
                       limits=LIMITS.model_copy(update={"concurrency": 2}))
    assert [[e.rollout.token_ids for e in g] for g in a] == [[e.rollout.token_ids for e in g] for g in b]
    assert len(generate.batches) > 3  # really batched differently


def test_episode_token_limit_truncates_with_reward_zero(tokenizer):
    engine = ScriptedEngine(tokenizer)
    results, _ = play(CounterEnv(turns=50, size=1), tokenizer, engine, n=1,
                      limits=LIMITS.model_copy(update={"max_episode_tokens": 40, "max_turns": 50}))
    e = results[0][0]
    assert e.truncated and e.score.reward == 0 and e.score.kind is ScoreKind.INVALID
    assert e.rollout.finish_reason == "length" and len(e.rollout.token_ids) <= 40
    assert all(len(q.prompt_ids) - len(e.rollout.prompt_ids) + q.max_tokens <= 40 for q in engine.requests)


def test_max_turns_ends_the_episode_invalid(tokenizer):
    results, _ = play(CounterEnv(turns=50, size=1), tokenizer, ScriptedEngine(tokenizer), n=1,
                      limits=LIMITS.model_copy(update={"max_turns": 4}))
    e = results[0][0]
    assert e.turns == 4 and e.score.kind is ScoreKind.INVALID and "max_turns" in e.score.error
    assert not e.truncated


def test_a_hostile_environment_costs_only_its_episode(tokenizer):
    env = HostileEnv(turns=3)
    results, _ = play(env, tokenizer, ScriptedEngine(tokenizer), n=2,
                      limits=LIMITS.model_copy(update={"step_timeout_s": 0.5}))
    by_kind = {s.answer: group for s, group in zip(env.samples("train", 0), results)}
    for kind in ("raise", "hang", "junk", "flood", "bad_reset"):
        for e in by_kind[kind]:
            assert e.score.reward == 0 and e.score.kind is ScoreKind.ENV_ERROR, (kind, e.score)
    assert all(e.truncated and e.score.kind is ScoreKind.INVALID for e in by_kind["long"])
    assert by_kind["bad_reset"][0].rollout.model_tokens == 0
    assert by_kind["hang"][0].turns == 2 and "timeout" in by_kind["hang"][0].score.error
    fair = [e for s, group in zip(env.samples("train", 0), results) if s.answer == "ok" for e in group]
    assert len(fair) == 4 and all(e.score.kind is ScoreKind.OK and e.turns == 3 for e in fair)


class SlowToolEnv(CounterEnv):
    """Sample 0's second tool call waits until every other episode has finished (or 5 s): it can
    only return early if the other episodes kept generating while it waited."""

    def __init__(self, others: int) -> None:
        super().__init__(turns=3, size=others + 1)
        self.others_done, self.done_event = 0, asyncio.Event()
        self.waited_out = False

    async def step(self, episode, turn):
        obs = await super().step(episode, turn)
        if episode.sample.id.endswith("/0") and episode.turn == 2:
            try:
                await asyncio.wait_for(self.done_event.wait(), 5.0)
            except asyncio.TimeoutError:
                self.waited_out = True
        elif obs.done:
            self.others_done += 1
            if self.others_done == self.size - 1:
                self.done_event.set()
        return obs


def test_a_slow_tool_does_not_stop_other_episodes(tokenizer):
    env, engine = SlowToolEnv(others=5), ScriptedEngine(tokenizer)
    results, generate = play(env, tokenizer, engine, n=1, limits=LIMITS.model_copy(update={"step_timeout_s": 30}))
    assert not env.waited_out  # the others finished all their turns while episode 0 waited on its tool
    slow = results[0][0]
    assert slow.score.kind is ScoreKind.OK and slow.turns == 3
    assert len(engine.requests) == 6 * 3 and generate.batches[0] == 6  # first turns went out together


def test_an_engine_failure_is_raised_not_scored(tokenizer):
    async def broken(requests):
        raise RolloutError("engine died")

    with pytest.raises(RolloutError, match="engine died"):
        play(CounterEnv(size=2), tokenizer, broken)


@pytest.mark.slow
def test_vllm_samples_follow_the_request_index_not_the_batch(ray_cluster, tiny_llama_dir, tokenizer):
    """A turn's sample depends on its seed index only, whatever else its batch holds; each request
    keeps its own max_tokens. Then whole episodes through the pool's Ray dispatcher."""
    import ray

    from posttrain.config import ModelConfig, RolloutConfig
    from posttrain.rollout.pool import RolloutPool
    from posttrain.rollout.types import TokenRequest

    gen = GenerationConfig(max_new_tokens=12, temperature=1.0, enable_thinking=False)
    ids = tokenizer.encode("<|im_start|>user\nSay something.<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    with RolloutPool(ModelConfig(name=str(tiny_llama_dir)), RolloutConfig(max_model_len=512)) as pool:
        assert pool.infos[0].backend == "vllm"
        a, b = TokenRequest(ids, False, 7, 12), TokenRequest(ids[:-1], False, 4099, 5)
        together = ray.get(pool.actors[0].generate_ids.remote([a, b], gen))
        alone = ray.get(pool.actors[0].generate_ids.remote([b, TokenRequest(ids, False, 8, 12)], gen))
        assert together[1].token_ids == alone[0].token_ids and len(alone[0].token_ids) <= 5
        assert together[0].token_ids != alone[1].token_ids  # another index, another sample
        env = CounterEnv(turns=2, size=2)
        results = pool.play([EpisodeJob(env, env.samples("train", 0), [0, 1])], gen, 2, LIMITS)[0]
    assert all(e.turns == 2 and e.score.kind is ScoreKind.OK and e.rollout.model_tokens > 0 for g in results for e in g)
