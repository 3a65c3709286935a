"""The GenRM judge's types: its settings, the outcome of one judge call, and the backend protocol.

Apart from :mod:`posttrain.genrm.backends` (local judge, backend choice) so that every backend,
:mod:`posttrain.genrm.openai_backend` included, imports them from below instead of from each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pydantic import Field, field_validator

from posttrain.config import MAX_TOP_LOGPROBS, Config
from posttrain.genrm.judge_format import PromptStyle, Scoring
from posttrain.rollout.types import TopTokens

Conversation = list[dict[str, str]]


class JudgeConfig(Config):
    """Where the GenRM runs and how it samples (`genrm.judge`)."""

    backend: Literal["local", "openai"] = Field(
        "local", description="local = GenRM on our rollout engines; openai = OpenAI-compatible server (vllm serve)"
    )
    base_url: str | None = Field(
        None, description="openai: endpoint incl. /v1, e.g. http://127.0.0.1:8000/v1 (required for backend=openai)"
    )
    model: str | None = Field(
        None,
        description="openai: served model name (None = the first model the server lists); "
        "local: GenRM model name/path for the judge engines (None = judge with the pool passed in)",
    )
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="env var holding the API key; unset = 'EMPTY' (vLLM accepts any key)"
    )
    headers: dict[str, str] = Field(default_factory=dict, description="openai: extra HTTP headers on every request")
    max_concurrency: int = Field(16, ge=1, description="openai: requests in flight at once")
    timeout_s: float = Field(120.0, gt=0, description="openai: limit of one request attempt (whole response)")
    max_retries: int = Field(
        3, ge=0, description="openai: retries after timeouts, connection errors, 408/409/429 and 5xx"
    )
    retry_backoff_s: float = Field(0.5, ge=0, description="first retry delay; doubles per retry, with jitter")
    retry_backoff_max_s: float = Field(20.0, ge=0, description="cap of one retry delay (also caps Retry-After)")
    temperature: float = Field(0.6, ge=0, description="judge sampling temperature (Qwen3 thinking: 0.6)")
    top_p: float = Field(0.95, gt=0, le=1, description="judge nucleus sampling (Qwen3 thinking: 0.95)")
    max_tokens: int = Field(1024, ge=1, description="judge completion budget: reasoning + JSON verdict")
    scoring: Scoring = Field("generate", description=(
        "generate = the values the judge wrote; expected = each written integer replaced by its expectation "
        "under the judge's top-k token distribution (finer verdicts from small judges; needs logprobs)"))
    top_logprobs: int = Field(MAX_TOP_LOGPROBS, ge=2, le=MAX_TOP_LOGPROBS, description=(
        "expected scoring: tokens read per position"))
    prompt_style: PromptStyle = Field("rubric", description=(
        "judge prompt: rubric (full scale, reason then JSON), compact (short, JSON only) or minimal "
        "(scales named, JSON only); "
        "use the style the GenRM was trained with"))
    enable_thinking: bool = Field(True, description=(
        "local: let the judge reason in <think> first (GenRMs do); off for small judges that answer at once"))
    seed: int | None = Field(None, description="sampling seed (openai: sent per request; local: None = 0)")
    extra_body: dict[str, Any] = Field(
        default_factory=dict,
        description="openai: extra request fields passed through, e.g. {chat_template_kwargs: {...}, top_k: 20}",
    )

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https:// (got {value!r}), e.g. http://127.0.0.1:8000/v1")
        return value


@dataclass(frozen=True)
class JudgeCall:
    """Outcome of one judge conversation: the raw completion, or why there is none."""

    text: str | None  # full completion incl. reasoning; None = failed after retries
    error: str | None  # short code: timeout, connection, rate_limit, http_500, engine_crashed, ...
    attempts: int  # requests sent (1 + retries)
    seconds: float  # wall time from the first attempt to the outcome (local: the whole batch)
    detail: str = ""  # error message or server reply snippet, for logs
    finish_reason: str | None = None  # "stop", "length" (judge budget too small), ...
    tokens: int = 0  # completion tokens, when the backend reports them
    top_tokens: TopTokens | None = None  # scoring=expected: the likeliest tokens at each position

    @property
    def ok(self) -> bool:
        return self.text is not None


class JudgeBackend(Protocol):
    """Anything that turns judge conversations into raw completions, one per conversation, in order.

    ``state_dict`` is what a resumed run needs to sample as an uninterrupted one (JSON data, e.g. a
    seed counter; ``{}`` for a stateless backend), given back through ``load_state_dict``.
    """

    def complete(self, batch: list[Conversation]) -> list[JudgeCall]: ...

    def close(self) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
