"""`guess_number`: higher/lower replies, the turn limit, unparsable guesses, the binary-search gold."""

from __future__ import annotations

import asyncio

import pytest

from posttrain.environments.base import Sample, ScoreKind
from posttrain.environments.check import play_episode
from posttrain.environments.guess_number_env import GuessNumberEnv, binary_search, parse_guess
from posttrain.environments.multiturn import AssistantTurn


def turn(text: str) -> AssistantTurn:
    return AssistantTurn(content=text, reasoning=None)


def play(env, secret, *texts):
    async def go():
        sample = Sample(id="s", messages=[{"role": "user", "content": env.prompt()}], answer=secret)
        episode = await env.reset(sample)
        return [await env.step(episode, turn(t)) for t in texts]
    return asyncio.run(go())


def test_replies_higher_and_lower_then_wins():
    obs = play(GuessNumberEnv(), 37, "50", "25", "\\boxed{37}")
    assert obs[0].messages == [{"role": "user", "content": "lower"}] and not obs[0].done
    assert obs[1].messages == [{"role": "user", "content": "higher"}] and not obs[1].done
    assert obs[2].done and (obs[2].score.reward, obs[2].score.kind) == (1.0, ScoreKind.OK)
    assert [o.metrics["guesses"] for o in obs] == [1.0, 1.0, 1.0]


def test_zero_at_the_last_guess():
    env = GuessNumberEnv(max_turns=3)
    obs = play(env, 37, "50", "25", "30")
    assert [o.done for o in obs] == [False, False, True]
    assert (obs[-1].score.reward, obs[-1].score.kind) == (0.0, ScoreKind.OK)


def test_a_reply_that_is_not_a_number_is_asked_again_and_counted():
    obs = play(GuessNumberEnv(), 37, "I think it might be 37", "37")
    assert obs[0].messages == [{"role": "user", "content": "Please answer with one whole number from 1 to 100."}]
    assert obs[0].errors == ("no number in the answer",) and obs[0].metrics["invalid_guesses"] == 1.0
    assert obs[1].score.reward == 1.0


@pytest.mark.parametrize(("text", "value"), [
    ("42", 42), (" 42.\n", 42), ("\\boxed{42}", 42), ("\\boxed{ -3 }", -3),
    ("42 or 43", None), ("my guess: 42", None), ("", None), ("4.5", None), ("1" * 13, None),
    ("\\boxed{9^{9}}", None), ("(" * 50 + "1" + ")" * 50, None), ("9" * 100_000, None),
])
def test_parse_guess_takes_only_a_bare_number(text, value):
    assert parse_guess(text) == value


def test_binary_search_wins_every_secret_within_seven():
    env = GuessNumberEnv()
    assert max(len(binary_search(s, 1, 100)) for s in range(1, 101)) == env.worst_case_guesses() == 7
    for secret in range(1, 101):
        sample = Sample(id="s", messages=[], answer=secret)
        gold = env.gold_episode(sample)
        score = asyncio.run(play_episode(env, sample, gold, repeat=False, max_turns=env.max_turns))
        assert score.reward == 1.0, (secret, gold)


def test_no_gold_when_the_turns_are_too_few():
    env = GuessNumberEnv(max_turns=3)
    assert env.gold_episode(Sample(id="s", messages=[], answer=50)) == ["50"]
    assert env.gold_episode(Sample(id="s", messages=[], answer=1)) is None


def test_samples_are_seeded_and_in_range():
    env = GuessNumberEnv(low=10, high=20, size=30, test_size=5)
    train, test = env.samples("train", 0), env.samples("test", 0)
    assert [s.answer for s in train] == [s.answer for s in env.samples("train", 0)]
    assert len(train) == 30 and len(test) == 5 and all(10 <= s.answer <= 20 for s in train + test)
    assert "from 10 to 20" in train[0].messages[-1]["content"] and env.tools == ()


@pytest.mark.parametrize("options", [{"max_turns": 0}, {"max_turns": 101}, {"low": 5, "high": 5}, {"size": 0}])
def test_bad_options(options):
    with pytest.raises(ValueError):
        GuessNumberEnv(**options)
