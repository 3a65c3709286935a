"""GenRM judge on an OpenAI-compatible endpoint (e.g. a big GenRM behind ``vllm serve``).

Requests run on a private event loop in a daemon thread that owns the HTTP client, so the same
judge works from plain code, from inside a running event loop, and from ``await`` (connections are
pooled across batches either way). The client's own retries are off: ours are the ones counted,
with exponential backoff and jitter, on timeouts, connection errors, 408/409/429 and 5xx.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import random
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from posttrain.errors import ConfigError, ServiceError
from posttrain.genrm.judge import Conversation, JudgeCall, JudgeConfig
from posttrain.rollout.types import TopTokens

_RETRYABLE_STATUS = {408, 409, 429}


@dataclass(frozen=True)
class _Outcome:
    value: Any  # the response, or None when every attempt failed
    error: str | None
    detail: str
    attempts: int


class OpenAIJudge:
    """Judge conversations via ``chat.completions.create``, at most ``max_concurrency`` at a time."""

    def __init__(self, cfg: JudgeConfig) -> None:
        if cfg.backend != "openai":
            raise ConfigError(f"OpenAIJudge needs judge.backend='openai' (got {cfg.backend!r})")
        if not cfg.base_url:
            raise ConfigError("judge.base_url is required for judge.backend='openai', e.g. "
                              "http://127.0.0.1:8000/v1 for `vllm serve MODEL --port 8000`")
        self.cfg = cfg
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client: Any = None  # openai.AsyncOpenAI, made on the private loop
        self._sem: asyncio.Semaphore | None = None
        self._model: str | None = cfg.model
        self._closed = False
        self._rng = random.Random()

    # ----------------------------------------------------------------- public API

    def complete(self, batch: list[Conversation]) -> list[JudgeCall]:
        """One JudgeCall per conversation, in order; blocks the caller (even inside a running loop)."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("OpenAIJudge.complete() would block its own event loop; use `await acomplete()`")
        return self._submit(batch).result()

    async def acomplete(self, batch: list[Conversation]) -> list[JudgeCall]:
        """As :meth:`complete`, awaited from any event loop without blocking it."""
        return await asyncio.wrap_future(self._submit(batch))

    def close(self) -> None:
        """Close the HTTP client and stop the private loop; the judge cannot be used afterwards."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop, self._thread, self._closed = None, None, True
        if loop is None or thread is None:
            return
        if self._client is not None:
            with contextlib.suppress(Exception):  # best effort: the loop goes away anyway
                asyncio.run_coroutine_threadsafe(self._client.close(), loop).result(timeout=10)
            self._client = None
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        if not thread.is_alive():
            loop.close()

    def state_dict(self) -> dict[str, Any]:
        return {}  # every request carries judge.seed as configured: nothing moves between batches

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Stateless: nothing to restore."""

    def __enter__(self) -> OpenAIJudge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- private loop

    def probe(self) -> None:
        """One one-token request before any real work: a judge that cannot answer (down, wrong URL, key or
        model name) is a :class:`ServiceError` naming the URL and the cause, not a run of fallback rewards."""
        call = self._submit(self._probe).result()
        if not call.ok:
            raise ServiceError(f"the judge at {self.cfg.base_url} does not answer ({call.error}, after "
                               f"{call.attempts} attempt(s)): {call.detail[:300]}. Is the server up, and are "
                               "judge.base_url (with /v1), judge.model and judge.api_key_env right?")

    async def _probe(self) -> JudgeCall:
        client = self._ensure_client()
        model, failed = await self._resolve_model(client)
        if failed is not None:
            return JudgeCall(None, failed.error, failed.attempts, 0.0, failed.detail)
        return await self._call(client, model, [{"role": "user", "content": "Say OK."}], max_tokens=1)

    def _submit(self, work: list[Conversation] | Callable[[], Coroutine[Any, Any, Any]]) -> concurrent.futures.Future[Any]:
        """Run ``work`` (a batch to judge, or a coroutine function) on the private loop."""
        with self._lock:
            if self._closed:
                raise RuntimeError("this OpenAIJudge is closed; build a new one with judge_backend(cfg)")
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=self._loop.run_forever, name="genrm-openai-judge",
                                                daemon=True)
                self._thread.start()
            loop = self._loop
        coroutine = self._batch(list(work)) if isinstance(work, list) else work()
        return asyncio.run_coroutine_threadsafe(coroutine, loop)

    async def _batch(self, batch: list[Conversation]) -> list[JudgeCall]:
        if not batch:
            return []
        client = self._ensure_client()
        model, failed = await self._resolve_model(client)
        if failed is not None:
            return [JudgeCall(None, failed.error, failed.attempts, 0.0, failed.detail) for _ in batch]
        return list(await asyncio.gather(*(self._call(client, model, m) for m in batch)))

    def _ensure_client(self) -> Any:
        if self._client is None:
            import openai

            self._client = openai.AsyncOpenAI(
                base_url=self.cfg.base_url, api_key=os.environ.get(self.cfg.api_key_env) or "EMPTY",
                max_retries=0, timeout=self.cfg.timeout_s, default_headers=self.cfg.headers or None)
            self._sem = asyncio.Semaphore(self.cfg.max_concurrency)
        return self._client

    async def _resolve_model(self, client: Any) -> tuple[str, _Outcome | None]:
        """``judge.model``, or the first model the server lists (vLLM serves one)."""
        if self._model is not None:
            return self._model, None

        async def first_model() -> str:
            page = await asyncio.wait_for(client.models.list(), self.cfg.timeout_s)
            if not page.data:
                raise ConfigError(f"{self.cfg.base_url}/models lists no model; set judge.model")
            return str(page.data[0].id)

        outcome = await self._retrying(first_model)
        if outcome.value is None:
            return "", outcome
        self._model = outcome.value
        return self._model, None

    # ----------------------------------------------------------------- one call

    async def _call(self, client: Any, model: str, messages: Conversation, max_tokens: int | None = None) -> JudgeCall:
        cfg = self.cfg
        kwargs: dict[str, Any] = {"model": model, "messages": messages, "temperature": cfg.temperature,
                                  "top_p": cfg.top_p, "max_tokens": max_tokens or cfg.max_tokens,
                                  "timeout": cfg.timeout_s}
        if cfg.seed is not None:
            kwargs["seed"] = cfg.seed
        if cfg.scoring == "expected":
            kwargs.update(logprobs=True, top_logprobs=cfg.top_logprobs)
        if cfg.extra_body:
            kwargs["extra_body"] = cfg.extra_body

        async def request() -> Any:
            assert self._sem is not None
            async with self._sem:  # held per attempt, not during backoff: others use the slot meanwhile
                return await asyncio.wait_for(client.chat.completions.create(**kwargs), cfg.timeout_s)

        start = time.perf_counter()
        outcome = await self._retrying(request)
        seconds = time.perf_counter() - start
        if outcome.value is None:
            return JudgeCall(None, outcome.error, outcome.attempts, seconds, outcome.detail)
        return _judge_call(outcome.value, outcome.attempts, seconds)

    async def _retrying(self, request: Callable[[], Awaitable[Any]]) -> _Outcome:
        """Run ``request`` until it succeeds, fails for good, or runs out of retries."""
        attempts = 0
        while True:
            attempts += 1
            try:
                return _Outcome(await request(), None, "", attempts)
            except Exception as exc:  # noqa: BLE001 - every failure becomes an error code
                error, retryable, retry_after = _classify(exc)
                if not retryable or attempts > self.cfg.max_retries:
                    return _Outcome(None, error, f"{type(exc).__name__}: {exc}"[:500], attempts)
                await asyncio.sleep(self._backoff(attempts, retry_after))

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Exponential delay with jitter (half to full), at least the server's Retry-After, capped."""
        cap = self.cfg.retry_backoff_max_s
        delay = min(cap, self.cfg.retry_backoff_s * 2 ** (attempt - 1)) * self._rng.uniform(0.5, 1.0)
        if retry_after is not None:
            delay = max(delay, min(retry_after, cap))
        return delay


def _classify(exc: Exception) -> tuple[str, bool, float | None]:
    """(error code, retryable, Retry-After seconds) of a failed request."""
    import openai

    if isinstance(exc, (asyncio.TimeoutError, openai.APITimeoutError)):
        return "timeout", True, None
    if isinstance(exc, openai.APIConnectionError):
        return "connection", True, None
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        retry_after = _retry_after(exc.response.headers.get("retry-after"))
        if status == 429:
            return "rate_limit", True, retry_after
        return f"http_{status}", status >= 500 or status in _RETRYABLE_STATUS, retry_after
    if isinstance(exc, LookupError):
        return "no_model", False, None
    return f"unexpected_{type(exc).__name__}", False, None


def _retry_after(value: str | None) -> float | None:
    try:
        return max(float(value), 0.0) if value is not None else None
    except ValueError:  # an HTTP date: fall back to our own backoff
        return None


def _judge_call(response: Any, attempts: int, seconds: float) -> JudgeCall:
    """JudgeCall from a chat completion; server-side reasoning is put back in front as <think>...</think>."""
    choices = getattr(response, "choices", None)
    if not choices:
        return JudgeCall(None, "empty_response", attempts, seconds, "response has no choices")
    choice = choices[0]
    message = getattr(choice, "message", None)
    content = getattr(message, "content", None)
    content = content if isinstance(content, str) else ""
    extra = getattr(message, "model_extra", None) or {}
    reasoning = extra.get("reasoning_content") or extra.get("reasoning")  # vLLM --reasoning-parser
    text = f"<think>{reasoning}</think>{content}" if isinstance(reasoning, str) and reasoning else content
    usage = getattr(response, "usage", None)
    tokens = getattr(usage, "completion_tokens", None)
    return JudgeCall(text, None, attempts, seconds, finish_reason=getattr(choice, "finish_reason", None),
                     tokens=tokens if isinstance(tokens, int) else 0, top_tokens=_top_tokens(choice))


def _top_tokens(choice: Any) -> TopTokens | None:
    """The choice's ``logprobs.content`` as (token, {alternative: logprob}) per position, when sent."""
    content = getattr(getattr(choice, "logprobs", None), "content", None)
    if not isinstance(content, list):
        return None
    out: TopTokens = []
    for item in content:
        token, logprob = getattr(item, "token", None), getattr(item, "logprob", None)
        if not isinstance(token, str):
            return None
        top = {t.token: t.logprob for t in getattr(item, "top_logprobs", None) or []
               if isinstance(getattr(t, "token", None), str) and isinstance(getattr(t, "logprob", None), (int, float))}
        if isinstance(logprob, (int, float)):
            top.setdefault(token, logprob)
        out.append((token, top))
    return out
