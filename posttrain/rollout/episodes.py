"""Token-exact multi-turn episodes, many at once.

An episode's first prompt is rendered and tokenised once. After that its tokens only grow::

    prompt_t+1 = prompt_t + generated_t + tokens(continuation(observation_t))

so the trainer sees exactly the ids the engine was given and produced -- the conversation is
never re-rendered or re-tokenised (re-rendering drifts tokens: a detokenise/retokenise round trip
is not the identity, and the trainer would score tokens the engine never sampled). Model tokens
carry the engine's logprobs and ``loss_mask`` 1; observation tokens (tool results, the
environment's replies, chat markup) carry logprob 0 and mask 0, so they never train.

Episodes run interleaved on one asyncio loop: each awaits its own turn's generation through a
:class:`Dispatcher`, which sends whatever requests are pending to any idle engine. An episode
waiting on a slow tool holds no engine; the others keep generating. The environment is only ever
called through ``reset_safely`` / ``step_safely``: its failures cost that episode alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from posttrain import chat_template, tool_calls
from posttrain.config import EpisodeConfig, GenerationConfig
from posttrain.environments.base import Sample, Score, ScoreKind
from posttrain.environments.multiturn import (
    AssistantTurn,
    Episode,
    MultiTurnEnvironment,
    reset_safely,
    step_safely,
)
from posttrain.rollout.budget import trained_mask
from posttrain.rollout.types import GeneratedTokens, Rollout, RolloutError, TokenRequest

TURN_STRIDE = 4096  # seed index of a turn = episode number * TURN_STRIDE + turn (EpisodeConfig.max_turns <= it)
END_TOKEN = "<|im_end|>"  # closes an assistant turn in the posttrain template

GenerateTurn = Callable[[TokenRequest], Awaitable[GeneratedTokens]]  # one request in, its completion out
EngineCall = Callable[[list[TokenRequest]], Awaitable[list[GeneratedTokens]]]  # a batch on one engine


@dataclass
class EpisodeResult:
    """One finished episode: its tokens as a Rollout, its reward, and what happened on the way."""

    rollout: Rollout
    score: Score
    turns: int  # assistant turns generated
    tool_calls: int = 0  # well-formed calls the model made
    tool_call_errors: int = 0  # malformed <tool_call> blocks
    step_errors: int = 0  # problems the environment reported in its observations
    truncated: bool = False  # ran out of max_episode_tokens / rollout.max_model_len


class Dispatcher:
    """Pending turn requests of many episodes, sent to whichever engines are idle.

    ``await dispatcher(request)`` queues one request; as soon as an engine is idle it takes every
    pending request (split evenly over the idle engines) as one batch. Requests that arrive in the
    same event-loop tick (all first turns) travel together. An engine error fails the requests of
    its batch (the caller restarts the engines and replays the step).
    """

    def __init__(self, engines: Sequence[EngineCall]) -> None:
        if not engines:
            raise ValueError("a Dispatcher needs at least one engine")
        self._idle: list[EngineCall] = list(engines)
        self._pending: list[tuple[TokenRequest, asyncio.Future[GeneratedTokens]]] = []
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches: list[int] = []  # size of every batch sent, in order

    @classmethod
    def in_process(cls, engine: Any, gen: GenerationConfig) -> Dispatcher:
        """Over one in-process :class:`~posttrain.rollout.engine.RolloutEngine` (a thread runs each
        batch, so environments keep stepping meanwhile)."""
        return cls([lambda requests: asyncio.to_thread(engine.generate_ids, requests, gen)])

    async def __call__(self, request: TokenRequest) -> GeneratedTokens:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[GeneratedTokens] = loop.create_future()
        self._pending.append((request, future))
        if not self._scheduled:  # after the other episodes that are ready in this tick
            self._scheduled = True
            loop.call_soon(self._dispatch)
        return await future

    def _dispatch(self) -> None:
        self._scheduled = False
        while self._pending and self._idle:
            take = -(-len(self._pending) // len(self._idle))
            batch, self._pending = self._pending[:take], self._pending[take:]
            task = asyncio.ensure_future(self._run(self._idle.pop(0), batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, engine: EngineCall, batch: list[tuple[TokenRequest, asyncio.Future[GeneratedTokens]]]) -> None:
        self.batches.append(len(batch))
        try:
            results = await engine([request for request, _ in batch])
            if len(results) != len(batch):
                raise RolloutError(f"engine returned {len(results)} completions for {len(batch)} requests")
        except Exception as exc:  # noqa: BLE001 - the waiting episodes re-raise it
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        else:
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)
        finally:
            self._idle.append(engine)
            self._dispatch()


@dataclass(frozen=True)
class EpisodeJob:
    """The samples of one environment to play in a step, with their positions in the step."""

    env: MultiTurnEnvironment
    samples: Sequence[Sample]
    indices: Sequence[int]


async def play_jobs(jobs: Sequence[EpisodeJob], n: int, generate: GenerateTurn, tokenizer: Any,
                    gen: GenerationConfig, limits: EpisodeConfig,
                    max_model_len: int | None = None) -> list[list[list[EpisodeResult]]]:
    """Every job's episodes on one loop, sharing the engines and ``limits.concurrency``: ``[job][sample][episode]``."""
    gate = asyncio.Semaphore(limits.concurrency)
    return list(await asyncio.gather(*(run_episodes(job.env, job.samples, n, generate, tokenizer, gen, limits,
                                                    indices=job.indices, max_model_len=max_model_len, gate=gate)
                                       for job in jobs)))


async def run_episodes(env: MultiTurnEnvironment, samples: Sequence[Sample], n: int, generate: GenerateTurn,
                       tokenizer: Any, gen: GenerationConfig, limits: EpisodeConfig, *,
                       indices: Sequence[int] | None = None, max_model_len: int | None = None,
                       gate: asyncio.Semaphore | None = None) -> list[list[EpisodeResult]]:
    """``n`` episodes per sample, interleaved; ``[sample][episode]`` results.

    ``indices``: each sample's position in the step (default 0..), which numbers its episodes for
    the sampling seeds and the rollouts' ``prompt_index``; ``max_model_len``: the engines' limit of
    prompt + completion tokens (a turn never asks for more); ``gate``: episodes in flight, shared with
    other calls (default: ``limits.concurrency`` for this call). Engine failures raise; environment
    failures end their episode at reward 0.
    """
    indices = list(indices) if indices is not None else list(range(len(samples)))
    if len(indices) != len(samples):
        raise ValueError(f"{len(samples)} samples but {len(indices)} indices")
    max_turns = min(limits.max_turns, _env_max_turns(env, limits.max_turns))
    gate = gate if gate is not None else asyncio.Semaphore(limits.concurrency)

    async def one(p: int, j: int) -> EpisodeResult:
        async with gate:
            run = _EpisodeRun(env, samples[p], indices[p], j, indices[p] * n + j, tokenizer, gen, limits,
                              max_turns, max_model_len)
            return await run.play(generate)

    flat = await asyncio.gather(*(one(p, j) for p in range(len(samples)) for j in range(n)))
    return [list(flat[p * n : (p + 1) * n]) for p in range(len(samples))]


def _env_max_turns(env: Any, default: int) -> int:
    value = getattr(env, "max_turns", default)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else default


@dataclass
class _Tape:
    """The episode's tokens: the first prompt, then model and observation tokens interleaved."""

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # engine's on model tokens, 0.0 on observations
    loss_mask: list[int] = field(default_factory=list)  # 1 on model tokens

    def context(self) -> list[int]:
        return self.prompt_ids + self.token_ids

    def add_model(self, out: GeneratedTokens) -> None:
        if len(out.logprobs) != len(out.token_ids):
            raise RolloutError(f"engine returned {len(out.token_ids)} tokens but {len(out.logprobs)} logprobs")
        self.token_ids += out.token_ids
        self.logprobs += [float(x) for x in out.logprobs]
        self.loss_mask += trained_mask(len(out.token_ids), out.forced)  # the forced closing tag is not the model's

    def add_observation(self, ids: list[int]) -> None:
        self.token_ids += ids
        self.logprobs += [0.0] * len(ids)
        self.loss_mask += [0] * len(ids)


class _EpisodeRun:
    """One episode from reset to its score."""

    def __init__(self, env: MultiTurnEnvironment, sample: Sample, prompt_index: int, sample_index: int, number: int,
                 tokenizer: Any, gen: GenerationConfig, limits: EpisodeConfig, max_turns: int,
                 max_model_len: int | None) -> None:
        self.env, self.sample, self.tokenizer, self.gen, self.limits = env, sample, tokenizer, gen, limits
        self.prompt_index, self.sample_index, self.number = prompt_index, sample_index, number
        self.max_turns, self.max_model_len = max_turns, max_model_len
        self.turns: list[AssistantTurn] = []
        self.reasoning_tokens = 0
        self.counts = {"tool_calls": 0, "tool_call_errors": 0, "step_errors": 0}
        self.metrics: dict[str, float] = {}
        self.tape = _Tape([])
        self.finish = "stop"
        self.reasoning_closed = True

    async def play(self, generate: GenerateTurn) -> EpisodeResult:
        episode = await reset_safely(self.env, self.sample, self.limits.step_timeout_s)
        messages = episode.messages if isinstance(episode, Episode) else self.sample.messages
        try:
            self.tape = _Tape(self._first_prompt(messages))
        except Exception as exc:  # noqa: BLE001 - messages or tools the template cannot render
            return self._result(Score.failed(ScoreKind.ENV_ERROR, f"cannot render the first prompt: "
                                             f"{type(exc).__name__}: {str(exc)[:200]}"))
        if not isinstance(episode, Episode):
            return self._result(episode)
        while True:
            if len(self.turns) >= self.max_turns:
                return self._result(Score.failed(ScoreKind.INVALID, f"no result within max_turns={self.max_turns}"))
            left = self._tokens_left()
            if left < 1:
                return self._truncated()
            thinking = chat_template.thinking_enabled(episode.messages, self.gen.enable_thinking)
            out = await generate(TokenRequest(self.tape.context(), thinking, self._seed_index(), left))
            self.tape.add_model(out)
            self.reasoning_tokens += out.reasoning_tokens
            turn = self._parse(out, thinking)
            if out.finish_reason == "length" and len(out.token_ids) >= left and left < self.gen.max_new_tokens:
                return self._truncated()  # cut by the episode's limit, not by the turn's own max_new_tokens
            episode.messages.append(tool_calls.assistant_message(turn))
            episode.turn += 1
            obs = await step_safely(self.env, episode, turn, self.limits.step_timeout_s)
            for key, value in obs.metrics.items():
                self.metrics[key] = self.metrics.get(key, 0.0) + value
            self.counts["step_errors"] += len(obs.errors)
            if obs.done:
                assert obs.score is not None  # checked_observation gives every done observation a score
                return self._result(obs.score)
            ended_with_eos = bool(out.token_ids) and out.token_ids[-1] == self._end_id()
            ids = chat_template.continuation_ids(self.tokenizer, obs.messages, ended_with_eos=ended_with_eos,
                                                 enable_thinking=thinking, reasoning_budget=self.gen.reasoning_budget)
            if len(ids) >= self._room():  # no room for the observation and one more token
                return self._truncated()
            self.tape.add_observation(ids)
            episode.messages.extend(obs.messages)

    def _first_prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        # a row may bring its own tools (http: NeMo-Gym rows carry them); else the environment's
        tools = list(self.sample.info.get("tools") or getattr(self.env, "tools", None) or [])
        text = chat_template.render(self.tokenizer, messages, add_generation_prompt=True,
                                    enable_thinking=self.gen.enable_thinking, reasoning_budget=self.gen.reasoning_budget,
                                    tools=tools or None)
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def _parse(self, out: GeneratedTokens, thinking: bool) -> AssistantTurn:
        """The turn as the environment sees it, also recorded in the episode's messages."""
        text = self.tokenizer.decode(out.token_ids, skip_special_tokens=True)
        try:
            turn = tool_calls.assistant_turn(text, thinking=thinking, finish_reason=out.finish_reason)
        except Exception as exc:  # noqa: BLE001 - a parser bug must not end the step; the turn is still played
            turn = AssistantTurn(content=text, reasoning=None, tool_call_errors=(f"parser: {type(exc).__name__}",),
                                 text=text, finish_reason=out.finish_reason)
        self.turns.append(turn)
        self.reasoning_closed = chat_template.split_reasoning(text, started_in_reasoning=thinking).reasoning_closed
        self.counts["tool_calls"] += len(turn.tool_calls)
        self.counts["tool_call_errors"] += len(turn.tool_call_errors)
        return turn

    def _room(self) -> int:
        """Tokens the episode may still grow by (max_episode_tokens, and the engines' max_model_len)."""
        room = self.limits.max_episode_tokens - len(self.tape.token_ids)
        if self.max_model_len is not None:
            room = min(room, self.max_model_len - len(self.tape.context()))
        return room

    def _tokens_left(self) -> int:
        """The next turn's max_tokens."""
        return min(self.gen.max_new_tokens, self._room())

    def _seed_index(self) -> int:
        return self.number * TURN_STRIDE + len(self.turns)

    def _end_id(self) -> int | None:
        return self.tokenizer.convert_tokens_to_ids(END_TOKEN)

    def _truncated(self) -> EpisodeResult:
        self.finish = "length"
        limit = f"max_episode_tokens={self.limits.max_episode_tokens}"
        if self.max_model_len is not None:
            limit += f" / rollout.max_model_len={self.max_model_len}"
        return self._result(Score.failed(ScoreKind.INVALID, f"episode truncated at {limit}"), truncated=True)

    def _result(self, score: Score, truncated: bool = False) -> EpisodeResult:
        if self.metrics:
            score.metrics = {**self.metrics, **score.metrics}
        return EpisodeResult(self._rollout(), score, len(self.turns), truncated=truncated, **self.counts)

    def _rollout(self) -> Rollout:
        tape, last = self.tape, (self.turns[-1] if self.turns else None)
        reasoning = [t.reasoning for t in self.turns if t.reasoning is not None]
        return Rollout(
            prompt_index=self.prompt_index, sample_index=self.sample_index, prompt_ids=tape.prompt_ids,
            token_ids=tape.token_ids, logprobs=tape.logprobs,
            text=self.tokenizer.decode(tape.token_ids, skip_special_tokens=True) if tape.token_ids else "",
            finish_reason="length" if self.finish == "length" else (last.finish_reason if last else "stop"),  # type: ignore[arg-type]
            reasoning="\n\n".join(reasoning) if reasoning else None, answer=last.content if last else "",
            reasoning_closed=self.reasoning_closed,
            reasoning_tokens=self.reasoning_tokens, loss_mask=tape.loss_mask, turns=len(self.turns))
