"""GenRM judge backends: an in-process fake OpenAI-compatible server and a stub rollout pool."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from posttrain.config import GenerationConfig
from posttrain.genrm.backends import JudgeCall, JudgeConfig, LocalJudge, judge_backend, summarize
from posttrain.genrm.openai_backend import OpenAIJudge
from posttrain.rollout.types import EngineCrashedError, EngineTimeoutError


class FakeServer(ThreadingHTTPServer):
    """POST /v1/chat/completions and GET /v1/models; behaviour chosen by the last message's content."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.in_flight = 0
        self.peak = 0
        self.delay = 0.0
        self.seen: Counter[str] = Counter()
        self.bodies: list[dict[str, Any]] = []
        self.auth: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(BaseHTTPRequestHandler):
    server: FakeServer

    def log_message(self, *args: Any) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        self._reply(200, {"object": "list", "data": [{"id": "served-genrm", "object": "model",
                                                       "created": 0, "owned_by": "test"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        srv = self.server
        prompt = body["messages"][-1]["content"]
        with srv.lock:
            srv.bodies.append(body)
            srv.auth.append(self.headers.get("Authorization", ""))
            srv.seen[prompt] += 1
            first = srv.seen[prompt] == 1
            srv.in_flight += 1
            srv.peak = max(srv.peak, srv.in_flight)
        try:
            time.sleep(1.5 if prompt == "slow" else srv.delay)
            if prompt == "fail-once" and first:
                return self._reply(500, {"error": {"message": "boom"}})
            if prompt == "busy-once" and first:
                return self._reply(429, {"error": {"message": "slow down"}}, {"Retry-After": "0"})
            if prompt == "bad":
                return self._reply(400, {"error": {"message": "max_tokens too large"}})
            message = {"role": "assistant", "content": f"judged:{prompt}"}
            if prompt == "think":
                message = {"role": "assistant", "content": "ANSWER", "reasoning_content": "REASONS"}
            choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": "stop"}
            if body.get("logprobs"):  # one "token" per character, each with its top alternatives
                choice["logprobs"] = {"content": [
                    {"token": ch, "logprob": -0.1, "bytes": None,
                     "top_logprobs": [{"token": ch, "logprob": -0.1, "bytes": None},
                                      {"token": "2", "logprob": -2.4, "bytes": None}][: body["top_logprobs"]]}
                    for ch in message["content"]]}
            self._reply(200, {"id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
                              "choices": [choice],
                              "usage": {"prompt_tokens": 3, "completion_tokens": 7, "total_tokens": 10}})
        finally:
            with srv.lock:
                srv.in_flight -= 1

    def _reply(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client gave up (timeout test)
            pass


@pytest.fixture
def server():
    srv = FakeServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _judge(srv: FakeServer, **kw: Any) -> OpenAIJudge:
    base = {"backend": "openai", "base_url": srv.url, "model": "genrm",
            "retry_backoff_s": 0.01, "retry_backoff_max_s": 0.05}
    return OpenAIJudge(JudgeConfig(**{**base, **kw}))


def _conv(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "judge"}, {"role": "user", "content": text}]


# --------------------------------------------------------------------------- OpenAIJudge


def test_results_in_order_and_sampling_fields_sent(server, monkeypatch):
    monkeypatch.setenv("GENRM_TEST_KEY", "sekret")
    server.delay = 0.0
    with _judge(server, api_key_env="GENRM_TEST_KEY", temperature=0.3, top_p=0.9, max_tokens=77, seed=5,
                extra_body={"chat_template_kwargs": {"enable_thinking": True}}) as judge:
        calls = judge.complete([_conv(f"p{i}") for i in range(6)])
    assert [c.text for c in calls] == [f"judged:p{i}" for i in range(6)]
    assert all(c.error is None and c.attempts == 1 and c.tokens == 7 and c.finish_reason == "stop" for c in calls)
    body = server.bodies[0]
    assert (body["model"], body["temperature"], body["top_p"], body["max_tokens"], body["seed"]) == (
        "genrm", 0.3, 0.9, 77, 5)
    assert body["chat_template_kwargs"] == {"enable_thinking": True}
    assert set(server.auth) == {"Bearer sekret"}


def test_expected_scoring_asks_for_top_logprobs_and_keeps_them(server):
    with _judge(server, scoring="expected", top_logprobs=2) as judge:
        call = judge.complete([_conv("p")])[0]
    body = server.bodies[0]
    assert body["logprobs"] is True and body["top_logprobs"] == 2
    assert "".join(t for t, _ in call.top_tokens) == call.text == "judged:p"
    assert call.top_tokens[0] == ("j", {"j": -0.1, "2": -2.4})
    with _judge(server) as judge:  # scoring=generate: no logprobs asked, none kept
        assert judge.complete([_conv("q")])[0].top_tokens is None
    assert "logprobs" not in server.bodies[-1]


def test_max_concurrency_is_reached_never_exceeded(server):
    server.delay = 0.3
    with _judge(server, max_concurrency=3) as judge:
        start = time.perf_counter()
        calls = judge.complete([_conv(f"c{i}") for i in range(9)])
        elapsed = time.perf_counter() - start
    assert all(c.ok for c in calls)
    assert server.peak == 3
    assert elapsed >= 0.85  # 9 requests, 3 at a time, 0.3 s each: three waves


@pytest.mark.parametrize("prompt,code", [("fail-once", "http_500"), ("busy-once", "rate_limit")])
def test_transient_error_is_retried_and_counted(server, prompt, code):
    with _judge(server, max_retries=2) as judge:
        calls = judge.complete([_conv(prompt), _conv("fine")])
    assert (calls[0].text, calls[0].error, calls[0].attempts) == (f"judged:{prompt}", None, 2)
    assert (calls[1].text, calls[1].attempts) == ("judged:fine", 1)
    assert server.seen[prompt] == 2
    assert summarize(calls)["genrm/retries"] == 1.0


def test_timeout_fails_after_all_attempts_others_succeed(server):
    with _judge(server, timeout_s=0.3, max_retries=1) as judge:
        calls = judge.complete([_conv("a"), _conv("slow"), _conv("b")])
    assert (calls[1].text, calls[1].error, calls[1].attempts) == (None, "timeout", 2)
    assert server.seen["slow"] == 2
    assert [calls[0].text, calls[2].text] == ["judged:a", "judged:b"]
    # two 0.3 s attempts (a lower bound holds on any machine); had the client waited for the
    # server's 1.5 s answer, the call would hold its text instead of a timeout
    assert calls[1].seconds > 0.55


def test_client_error_is_not_retried(server):
    with _judge(server, max_retries=3) as judge:
        [call] = judge.complete([_conv("bad")])
    assert (call.text, call.error, call.attempts) == (None, "http_400", 1)
    assert "max_tokens too large" in call.detail
    assert server.seen["bad"] == 1


def test_connection_refused_is_retried_then_fails():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = JudgeConfig(backend="openai", base_url=f"http://127.0.0.1:{port}/v1", model="m", max_retries=2,
                      retry_backoff_s=0.01, retry_backoff_max_s=0.02)
    with OpenAIJudge(cfg) as judge:
        calls = judge.complete([_conv("x"), _conv("y")])
    assert [(c.text, c.error, c.attempts) for c in calls] == [(None, "connection", 3)] * 2
    metrics = summarize(calls)
    assert (metrics["genrm/call_failures"], metrics["genrm/retries"], metrics["genrm/errors/connection"]) == (
        2.0, 4.0, 2.0)


def test_complete_inside_running_loop_and_acomplete(server):
    judge = _judge(server)

    async def inside() -> tuple[list[JudgeCall], list[JudgeCall]]:
        return judge.complete([_conv("sync")]), await judge.acomplete([_conv("async")])

    sync_calls, async_calls = asyncio.run(inside())
    again = judge.complete([_conv("after")])  # the private loop outlives the caller's loop
    judge.close()
    assert [sync_calls[0].text, async_calls[0].text, again[0].text] == ["judged:sync", "judged:async", "judged:after"]
    with pytest.raises(RuntimeError, match="closed"):
        judge.complete([_conv("x")])


def test_model_discovered_and_key_defaults_to_empty(server, monkeypatch):
    monkeypatch.delenv("GENRM_MISSING_KEY", raising=False)
    with _judge(server, model=None, api_key_env="GENRM_MISSING_KEY") as judge:
        calls = judge.complete([_conv("m")])
    assert calls[0].text == "judged:m"
    assert server.bodies[0]["model"] == "served-genrm"
    assert server.auth == ["Bearer EMPTY"]


def test_server_side_reasoning_is_put_back_in_front(server):
    with _judge(server) as judge:
        [call] = judge.complete([_conv("think")])
    assert call.text == "<think>REASONS</think>ANSWER"


def test_missing_base_url_is_a_clear_error():
    cfg = JudgeConfig(backend="openai")
    with pytest.raises(ValueError, match="base_url is required.*http://127.0.0.1:8000/v1"):
        OpenAIJudge(cfg)
    with pytest.raises(ValueError, match="base_url is required"):
        judge_backend(cfg)
    with pytest.raises(ValueError, match="http:// or https://"):
        JudgeConfig(backend="openai", base_url="127.0.0.1:8000/v1")


# --------------------------------------------------------------------------- LocalJudge


@dataclass
class FakeRollout:
    text: str
    token_ids: list[int]
    finish_reason: str = "stop"


class StubPool:
    """Records generate() calls; answers 'out:<last message>' or raises ``fail``."""

    def __init__(self, fail: Exception | None = None, groups: Any = None) -> None:
        self.calls: list[tuple[list[Any], GenerationConfig, int | None]] = []
        self.fail, self.groups = fail, groups

    def generate(self, prompts: list[Any], gen: GenerationConfig, n: int | None = None) -> Any:
        self.calls.append((prompts, gen, n))
        if self.fail is not None:
            raise self.fail
        if self.groups is not None:
            return self.groups
        return [[FakeRollout(f"r</think>out:{p[-1]['content']}", [1, 2, 3],
                             "length" if p[-1]["content"] == "long" else "stop")] for p in prompts]


def test_local_one_generate_call_in_order():
    pool = StubPool()
    gen = GenerationConfig(max_new_tokens=99, seed=10)
    judge = LocalJudge(pool, gen)
    calls = judge.complete([_conv("a"), _conv("long"), _conv("c")])
    assert [c.text for c in calls] == ["r</think>out:a", "r</think>out:long", "r</think>out:c"]
    assert len(pool.calls) == 1
    prompts, used, n = pool.calls[0]
    assert n == 1 and prompts == [_conv("a"), _conv("long"), _conv("c")] and used.max_new_tokens == 99
    judge.complete([_conv("d")])
    assert [c[1].seed for c in pool.calls] == [10, 11]  # a fresh seed per batch
    metrics = summarize(calls)
    assert (metrics["genrm/calls"], metrics["genrm/truncated"], metrics["genrm/completion_tokens_mean"]) == (
        3.0, 1.0, 3.0)
    assert judge.complete([]) == [] and len(pool.calls) == 2


@pytest.mark.parametrize("exc,code", [(EngineTimeoutError("rollout-0 timed out"), "timeout"),
                                      (EngineCrashedError("rollout-1 died"), "engine_crashed"),
                                      (RuntimeError("cuda oops"), "engine_error")])
def test_local_engine_error_fails_every_call(exc, code):
    calls = LocalJudge(StubPool(fail=exc), GenerationConfig()).complete([_conv("a"), _conv("b")])
    assert [(c.text, c.error, c.attempts) for c in calls] == [(None, code, 1)] * 2
    assert str(exc) in calls[0].detail


def test_local_malformed_pool_output_does_not_raise():
    short = LocalJudge(StubPool(groups=[[FakeRollout("x", [])]]), GenerationConfig()).complete([_conv("a")] * 2)
    assert [c.error for c in short] == ["bad_engine_output"] * 2
    mixed = LocalJudge(StubPool(groups=[[], [FakeRollout("ok", [1])]]), GenerationConfig())
    assert [(c.text, c.error) for c in mixed.complete([_conv("a"), _conv("b")])] == [
        (None, "bad_engine_output"), ("ok", None)]


def test_factory_errors_and_generation_from_config():
    with pytest.raises(ValueError, match="needs a rollout pool"):
        judge_backend(JudgeConfig())
    with pytest.raises(ValueError, match="backend=openai"):
        judge_backend(JudgeConfig(base_url="http://127.0.0.1:8000/v1"), pool=StubPool())
    judge = judge_backend(JudgeConfig(max_tokens=321, temperature=0.7, top_p=0.8, seed=4), pool=StubPool())
    assert isinstance(judge, LocalJudge)
    assert (judge.generation.max_new_tokens, judge.generation.temperature, judge.generation.top_p,
            judge.generation.seed, judge.generation.enable_thinking) == (321, 0.7, 0.8, 4, True)
    assert judge.generation.top_logprobs == 0
    assert judge_backend(JudgeConfig(scoring="expected"), pool=StubPool()).generation.top_logprobs == 20


def test_summarize_empty_batch_is_all_zero():
    metrics = summarize([])
    assert metrics["genrm/calls"] == 0.0 and metrics["genrm/call_seconds_mean"] == 0.0
    assert not any(k.startswith("genrm/errors/") for k in metrics)


# --------------------------------------------------------------------------- a judge that is down is loud


def _refused_url() -> str:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


def test_probe_names_the_url_and_the_cause():
    from posttrain.errors import ServiceError

    url = _refused_url()
    with OpenAIJudge(JudgeConfig(backend="openai", base_url=url, max_retries=1, retry_backoff_s=0.01)) as judge:
        with pytest.raises(ServiceError, match=rf"the judge at {url} does not answer \(connection, after 2 "
                                               r"attempt\(s\)\).*Is the server up"):
            judge.probe()


def test_probe_passes_on_a_live_server_with_one_one_token_request(server):
    with _judge(server, model=None) as judge:
        judge.probe()
    assert [b["max_tokens"] for b in server.bodies] == [1] and server.bodies[0]["model"] == "served-genrm"


def test_the_rlhf_environment_refuses_to_start_against_a_down_judge():
    from posttrain.environments.base import StageResources
    from posttrain.environments.registry import load_environment
    from posttrain.errors import ServiceError

    url = _refused_url()
    env = load_environment("genrm", judge={"backend": "openai", "base_url": url, "max_retries": 0})
    with pytest.raises(ServiceError, match=url):
        env.start(StageResources())
    env.close()


class DownJudge:
    """A judge backend that answers nothing (every call a connection failure), or everything when ``up``."""

    def __init__(self) -> None:
        self.up = False

    def complete(self, batch):
        if self.up:
            return [JudgeCall('{"score_1": 4, "score_2": 2, "ranking": 2}', None, 1, 0.0) for _ in batch]
        return [JudgeCall(None, "connection", 4, 0.0, "ConnectionRefusedError") for _ in batch]

    def close(self) -> None: ...

    def state_dict(self):
        return {}

    def load_state_dict(self, state) -> None: ...


def test_consecutive_failed_steps_stop_the_run_and_a_good_step_resets_the_count(caplog):
    from posttrain.environments.base import Completion, score_groups_safely
    from posttrain.errors import ServiceError
    from posttrain.genrm.environment import GenRMEnv

    backend = DownJudge()
    env = GenRMEnv(backend=backend, size=2, max_failed_steps=2, judge={"model": "x"})
    sample = env.samples("train", 0)[0]
    groups = [[Completion("a"), Completion("b")]]

    def step():
        return asyncio.run(score_groups_safely(env, [sample], groups, timeout=10))

    scores = step()  # first failed step: warned, nothing trained (infra), run goes on
    assert [s.kind.value for s in scores[0]] == ["infra", "infra"]
    assert "every judge call of this step failed (1 calls: connection x1; judge: engines genrm-* (x))" in caplog.text
    backend.up = True
    assert [s.kind.value for s in step()[0]] == ["ok", "ok"]  # the judge came back: count reset
    backend.up = False
    step()
    with pytest.raises(ServiceError, match=r"2 such step\(s\) in a row.*Stopped after 2 \(genrm option max_failed_steps\)"):
        step()
    warn_only = GenRMEnv(backend=DownJudge(), size=2, max_failed_steps=None, judge={"model": "x"})
    for _ in range(4):
        asyncio.run(score_groups_safely(warn_only, [sample], groups, timeout=10))


def test_genrm_eval_of_a_served_judge_counts_what_it_counts(server, capsys):
    from posttrain.cli import main

    assert main(["genrm", "eval", "limit=3", f"judge.base_url={server.url}", "judge.backend=openai",
                 "judge.retry_backoff_s=0.01"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["n_pairs"], out["n_judgements"], out["n_readable"], out["failed_call_rate"]) == (3, 6, 0, 0.0)
    assert out["format_error_rate"] == 1.0 and "pairwise_accuracy" not in out  # nothing readable: no figure
    assert server.bodies[0]["max_tokens"] == 1 and server.bodies[1]["temperature"] == 0.0  # probe, then greedy
    url = _refused_url()
    assert main(["genrm", "eval", "limit=1", f"judge.base_url={url}", "judge.backend=openai",
                 "judge.max_retries=0"]) == 2
    assert f"the judge at {url} does not answer" in capsys.readouterr().err
