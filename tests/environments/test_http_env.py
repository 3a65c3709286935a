"""`http` against a local toy resource server in NeMo-Gym's shape (/seed_session, one tool as
POST /get_value, /verify returning a reward), with the session kept in a cookie per episode."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from posttrain.environments.base import ScoreKind
from posttrain.environments.check import check_environment
from posttrain.environments.http_env import HttpEnv
from posttrain.environments.multiturn import AssistantTurn, ToolCall, reset_safely, step_safely
from posttrain.errors import DataError

TOOL = {"type": "function", "name": "get_value", "description": "Look up the value of a key.", "strict": True,
        "parameters": {"type": "object", "properties": {"key": {"type": "string"}}, "required": ["key"],
                       "additionalProperties": False}}


def row(key: str, **extra):
    return {"responses_create_params": {"input": [{"role": "user", "content": f"What is the value of {key}?"}],
                                        "tools": [TOOL]}, "key": key, "expected": sum(map(ord, key)), **extra}


class ToyServer:
    """A resources server: sessions by cookie, one tool, /verify (reward 1 when the last message says the
    expected value and the session called the tool)."""

    def __init__(self):
        self.sessions: dict[str, dict] = {}
        self.verified: list[dict] = []
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"null")
                server.requests.append(self.path)
                cookie = self.headers.get("Cookie", "")
                sid = cookie.split("session=", 1)[1].split(";")[0] if "session=" in cookie else None
                status, reply, cookies = server.handle(self.path, body, sid)
                data = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
                self.send_response(status)
                for k, v in cookies.items():
                    self.send_header("Set-Cookie", f"{k}={v}; Path=/; HttpOnly")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def handle(self, path, body, sid):
        if path == "/seed_session":
            sid = uuid.uuid4().hex
            self.sessions[sid] = {"calls": 0, "key": body["key"]}
            return 200, {}, {"session": sid}
        session = self.sessions.get(sid)
        if session is None:
            return 400, {"detail": "no session"}, {}
        if path == "/get_value":
            key = body.get("key") if isinstance(body, dict) else None
            if not key:
                return 422, {"detail": "key must be a non-empty string"}, {}
            if key == "boom":
                return 500, b"Internal Server Error", {}
            if key == "slow":
                time.sleep(3)
            session["calls"] += 1
            return 200, {"value": sum(map(ord, key)), **({"done": True} if key == "done" else {})}, {}
        if path == "/verify":
            self.verified.append(body)
            if body.get("broken"):
                return 200, b"not json", {}
            if body.get("masked"):
                return 200, {"reward": 0.0, "mask_sample": True, "failure_reason": "judge down"}, {}
            texts = [p["text"] for item in body["response"]["output"] if item["type"] == "message"
                     for p in item["content"]]
            right = bool(texts) and str(body["expected"]) in texts[-1] and session["calls"] > 0
            return 200, {**body, "reward": float(right), "accuracy": right, "calls": session["calls"]}, {}
        return 404, {"detail": "Not Found"}, {}

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = ToyServer()
    yield s
    s.close()


@pytest.fixture
def dataset(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [row("apple"), row("kiwi"), row("plum", masked=True), row("fig", broken=True), row("lime")]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def call(**arguments) -> AssistantTurn:
    return AssistantTurn(content="", reasoning="let me look", tool_calls=(ToolCall("get_value", arguments),))


def say(text: str) -> AssistantTurn:
    return AssistantTurn(content=text, reasoning=None)


def episode(env, sample, *turns, timeout=10.0):
    """Observations of ``turns`` through the runner's safe wrappers (a Score if reset failed)."""
    async def go():
        ep = await reset_safely(env, sample, timeout)
        if not hasattr(ep, "state"):
            return ep
        out = []
        for t in turns:
            out.append(await step_safely(env, ep, t, timeout))
            if out[-1].done:
                break
        return out
    return asyncio.run(go())


def test_samples_and_tools_come_from_the_rows(server, dataset):
    env = HttpEnv(server.url, dataset, test_fraction=0.2)
    train, test = env.samples("train", 0), env.samples("test", 0)
    assert len(train) == 4 and len(test) == 1
    assert train[0].messages == [{"role": "user", "content": "What is the value of apple?"}]
    chat = {"type": "function", "function": {"name": "get_value", "description": "Look up the value of a key.",
                                             "parameters": TOOL["parameters"]}}
    assert env.tools == [chat] and train[0].info["tools"] == [chat]
    assert train[0].answer == row("apple")


def test_a_tool_call_then_an_answer_is_verified(server, dataset):
    env = HttpEnv(server.url, dataset)
    sample = env.samples("train", 0)[0]
    tool, final = episode(env, sample, call(key="apple"), say("The value is 530."))
    assert tool.messages == [{"role": "tool", "name": "get_value", "content": '{"value": 530}'}]
    assert tool.metrics == {"tool_calls": 1.0, "tool_errors": 0.0}
    assert final.done and (final.score.reward, final.score.kind) == (1.0, ScoreKind.OK)
    assert final.score.metrics == {"expected": 530.0, "accuracy": 1.0, "calls": 1.0}  # numbers of the reply
    assert server.requests == ["/seed_session", "/get_value", "/verify"]
    response = server.verified[-1]["response"]
    assert [item["type"] for item in response["output"]] == ["reasoning", "function_call", "function_call_output",
                                                            "message"]
    assert response["output"][1]["call_id"] == response["output"][2]["call_id"]
    assert json.loads(response["output"][1]["arguments"]) == {"key": "apple"}
    assert server.verified[-1]["key"] == "apple"  # the row's task fields go to /verify too


def test_the_response_sent_to_verify_is_an_openai_response(server, dataset):
    responses = pytest.importorskip("openai.types.responses")
    env = HttpEnv(server.url, dataset)
    episode(env, env.samples("train", 0)[0], call(key="apple"), say("530"))
    responses.Response.model_validate(server.verified[-1]["response"])


def test_sessions_are_per_episode(server, dataset):
    env = HttpEnv(server.url, dataset)
    a, b = env.samples("train", 0)[:2]

    async def go():
        ea, eb = await env.reset(a), await env.reset(b)  # interleaved: each must keep its own cookie
        await env.step(ea, call(key="apple"))
        await env.step(eb, call(key="kiwi"))
        await env.step(ea, call(key="apple"))
        return await env.step(ea, say("530")), await env.step(eb, say("436"))

    fa, fb = asyncio.run(go())
    assert fa.score.reward == fb.score.reward == 1.0
    assert sorted((s["key"], s["calls"]) for s in server.sessions.values()) == [("apple", 2), ("kiwi", 1)]


def test_no_tool_call_scores_zero(server, dataset):
    env = HttpEnv(server.url, dataset)
    (final,) = episode(env, env.samples("train", 0)[0], say("530"))
    assert final.done and (final.score.reward, final.score.kind) == (0.0, ScoreKind.OK)


def test_bad_calls_are_tool_errors_and_never_reach_the_server(server, dataset):
    env = HttpEnv(server.url, dataset)
    turn = AssistantTurn(content="", reasoning=None, tool_call_errors=("not JSON",),
                         tool_calls=(ToolCall("get_value", {"name": "apple"}), ToolCall("rm", {})))
    (obs,) = episode(env, env.samples("train", 0)[0], turn)
    assert not obs.done and [m["content"] for m in obs.messages] == [
        "error: malformed tool call: not JSON", "error: bad arguments for get_value: 'key' is a required property",
        "error: unknown tool 'rm'; the tools are: get_value"]
    assert obs.metrics == {"tool_calls": 2.0, "tool_errors": 3.0}
    assert server.requests == ["/seed_session"]


def test_a_4xx_reply_is_shown_to_the_model(server, dataset):
    env = HttpEnv(server.url, dataset)
    obs, final = episode(env, env.samples("train", 0)[0], call(key=""), say("?"))
    assert obs.messages[0]["content"] == 'error: get_value answered 422: {"detail": "key must be a non-empty string"}'
    assert obs.errors and not obs.done and final.done


@pytest.mark.parametrize(("turns", "detail"), [
    ([call(key="boom")], "POST /get_value answered 500"),
    ([call(key="slow")], "POST /get_value failed: TimeoutError"),
])
def test_http_failures_end_the_episode_as_env_error(server, dataset, turns, detail):
    env = HttpEnv(server.url, dataset, tool_timeout_s=1.0)
    (obs,) = episode(env, env.samples("train", 0)[0], *turns)
    assert obs.done and (obs.score.reward, obs.score.kind) == (0.0, ScoreKind.ENV_ERROR)
    assert obs.score.error.startswith(detail), obs.score.error


def test_verify_failures(server, dataset):
    env = HttpEnv(server.url, dataset)
    masked, broken = env.samples("train", 0)[2:4]
    (obs,) = episode(env, masked, say("x"))
    assert (obs.score.reward, obs.score.kind) == (0.0, ScoreKind.INFRA) and "judge down" in obs.score.error
    (obs,) = episode(env, broken, say("x"))
    assert (obs.score.reward, obs.score.kind) == (0.0, ScoreKind.ENV_ERROR) and "not JSON" in obs.score.error


def test_an_unreachable_server_fails_the_episode_not_the_run(dataset):
    env = HttpEnv("http://127.0.0.1:9", dataset)  # port 9 (discard): nothing listens
    score = episode(env, env.samples("train", 0)[0], say("x"))
    assert (score.reward, score.kind) == (0.0, ScoreKind.ENV_ERROR) and "seed_session" in score.error


def test_done_flag_ends_the_episode_after_the_tool(server, dataset):
    env = HttpEnv(server.url, dataset, done_flag=True)
    (obs,) = episode(env, env.samples("train", 0)[0], call(key="done"))
    assert obs.done and obs.score.kind == ScoreKind.OK and obs.metrics["tool_calls"] == 1.0
    assert server.requests[-1] == "/verify"


def test_env_check_garbage_scores_zero(server, dataset):
    env = HttpEnv(server.url, dataset, max_turns=3)
    report = check_environment(env, n=2)
    assert report.ok and report.n_gold == 0, "\n".join(report.lines())


def test_options_and_dataset_errors(server, dataset, tmp_path):
    with pytest.raises(ValueError, match="base_url"):
        HttpEnv("localhost:8000", dataset)
    with pytest.raises(DataError, match="not found"):
        HttpEnv(server.url, str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "no responses_create_params"}\n')
    with pytest.raises(DataError, match="responses_create_params"):
        HttpEnv(server.url, str(bad))
    parts = tmp_path / "parts.jsonl"
    parts.write_text(json.dumps({"responses_create_params": {"input": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "input_text", "text": "Hi "}, {"type": "input_text", "text": "there"}]}],
        "tools": []}}) + "\n")
    env = HttpEnv(server.url, str(parts), tools=[TOOL], test_fraction=0.0)
    assert env.samples("train", 0)[0].messages == [{"role": "system", "content": "Be brief."},
                                                   {"role": "user", "content": "Hi there"}]
    assert env.tools[0]["function"]["name"] == "get_value"


def test_a_separate_test_dataset(server, dataset, tmp_path):
    held_out = tmp_path / "test.jsonl"
    held_out.write_text(json.dumps(row("pear")) + "\n" + json.dumps({"responses_create_params": {"input": []}}) + "\n")
    env = HttpEnv(server.url, dataset, test_dataset=str(held_out))
    assert len(env.samples("train", 0)) == 5
    with pytest.raises(DataError, match="test.jsonl row 1: responses_create_params.input"):
        env.samples("test", 0)
