"""`http`: an environment served by another process, in NeMo-Gym's resource-server shape.

Any language can serve an environment by speaking the protocol of NeMo-Gym's resources servers
(``nemo_gym/base_resources_server.py``), driven here the way its ``simple_agent`` drives them:

- a dataset row (JSONL, one per line) is ``{"responses_create_params": {"input": [messages],
  "tools": [Responses-API function tools]}, ...task fields}``; the server has no dataset
  endpoint, so the rows come from the ``dataset`` file;
- ``POST /seed_session`` with the row starts an episode; the cookies it sets (NeMo-Gym keeps
  its session id in a signed session cookie) go with every later request of that episode only;
- each tool call is ``POST /<tool name>`` with the arguments as the JSON body; the reply body
  is the ``tool`` message (a 4xx reply too: it says what the model got wrong, a counted error);
- a turn without tool calls ends the episode: ``POST /verify`` with the row plus ``response``
  (the episode as a Responses-API object: reasoning, messages, function calls and outputs)
  answers ``{"reward": float, ...}``; its other numeric fields become score metrics, and
  ``mask_sample: true`` (the server says its own infrastructure failed) is an ``infra`` score.

Every HTTP failure -- no connection, a timeout, a 5xx reply, a reply that is not the JSON the
protocol says -- ends that episode only, at reward 0 with ``env_error``.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from pathlib import Path
from typing import Any

from posttrain.environments.base import DefaultHooks, Messages, Sample, Score, ScoreKind
from posttrain.environments.multiturn import AssistantTurn, Episode, Observation, ended
from posttrain.environments.tools import Tool, ToolBox, ToolError
from posttrain.errors import DataError

MAX_REPLY_BYTES = 1 << 20  # a tool or verify reply larger than this is an environment failure
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class HttpFailure(Exception):
    """The server failed (unreachable, timed out, 5xx, bad JSON): the episode ends as env_error."""


def chat_tool(tool: Any) -> dict[str, Any]:
    """A Responses-API function tool (flat) or a chat one (nested under "function") -> the chat shape."""
    if not isinstance(tool, dict):
        raise DataError(f"a tool must be an object (got {type(tool).__name__})")
    spec = tool.get("function") if isinstance(tool.get("function"), dict) else tool
    if tool.get("type", "function") != "function" or not isinstance(spec.get("name"), str) or not spec["name"]:
        raise DataError(f"only function tools with a name are supported (got {json.dumps(tool)[:120]})")
    parameters = spec.get("parameters") or {"type": "object", "properties": {}}
    return {"type": "function", "function": {"name": spec["name"], "description": str(spec.get("description") or ""),
                                             "parameters": parameters}}


def chat_messages(items: Any) -> Messages:
    """``responses_create_params.input`` (a string, or messages whose content is text or text parts)."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise DataError("responses_create_params.input must be a string or a non-empty list of messages")
    out = []
    for i, item in enumerate(items):
        role = _ROLES.get(item.get("role")) if isinstance(item, dict) else None
        content = item.get("content") if isinstance(item, dict) else None
        if isinstance(content, list):
            content = "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
        if role is None or not isinstance(content, str):
            raise DataError(f"input message {i} must have role system/developer/user/assistant and text content")
        out.append({"role": role, "content": content})
    return out


def read_rows(path: str, limit: int | None = None) -> list[dict[str, Any]]:
    """JSON lines, as they are: no schema inference (tools' JSON schemas differ row by row)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"http dataset {path!r} not found: give a JSONL file of NeMo-Gym rows")
    rows = []
    for n, line in enumerate(file.read_text().splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise DataError(f"{path}:{n}: not JSON ({exc})") from None
            if not isinstance(row, dict) or not isinstance(row.get("responses_create_params"), dict):
                raise DataError(f"{path}:{n}: a row needs a 'responses_create_params' object")
            rows.append(row)
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise DataError(f"http dataset {path!r} has no rows")
    return rows


class HttpEnv(DefaultHooks):
    """Multi-turn tool use against a NeMo-Gym style resource server over HTTP.

    Options:
        base_url: the server, http(s)://host:port
        dataset: JSONL file of NeMo-Gym rows
        test_dataset: held-out rows (None = the last test_fraction of dataset)
        test_fraction: share of dataset held out when test_dataset is None, in [0, 1)
        limit: first N rows (None = all)
        tools: chat or Responses-API function schemas used for every row instead of its own
        max_turns: assistant turns per episode
        timeout_s: limit of the seed and verify calls
        tool_timeout_s: limit of one tool call
        max_output_chars: a tool reply is cut to this length
        done_flag: a tool reply {"done": true} ends the episode (NeMo-Gym's use_done_flag)
        system: system message added when a row has none
        model_name: the model field of the response sent to /verify
    """

    name = "http"
    eval_metrics = ("tool_calls", "tool_errors")

    def __init__(self, base_url: str, dataset: str, test_dataset: str | None = None, test_fraction: float = 0.1,
                 limit: int | None = None, tools: list[dict[str, Any]] | None = None, max_turns: int = 8,
                 timeout_s: float = 60.0, tool_timeout_s: float = 30.0, max_output_chars: int = 8000,
                 done_flag: bool = False, system: str | None = None, model_name: str = "policy") -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL, e.g. http://127.0.0.1:8000 (got {base_url!r})")
        if not 0.0 <= test_fraction < 1.0 or max_turns < 1 or timeout_s <= 0 or tool_timeout_s <= 0:
            raise ValueError("test_fraction must be in [0, 1), max_turns >= 1, timeouts > 0 "
                             f"(got {test_fraction}, {max_turns}, {timeout_s}, {tool_timeout_s})")
        self.base_url = base_url.rstrip("/")
        self.dataset, self.test_dataset, self.test_fraction, self.limit = dataset, test_dataset, test_fraction, limit
        self.fixed_tools = None if tools is None else [chat_tool(t) for t in tools]
        self.max_turns, self.timeout_s, self.tool_timeout_s = max_turns, timeout_s, tool_timeout_s
        self.max_output_chars, self.done_flag = max_output_chars, done_flag
        self.system, self.model_name = system, model_name
        self._rows = read_rows(dataset, limit)  # read now: a bad path fails at load, not mid-run
        self.tools = self.fixed_tools if self.fixed_tools is not None else self._row_tools(self._rows[0])

    def _row_tools(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        if self.fixed_tools is not None:
            return self.fixed_tools
        tools = row["responses_create_params"].get("tools") or []
        if not isinstance(tools, list):
            raise DataError("responses_create_params.tools must be a list")
        return [chat_tool(t) for t in tools]

    def samples(self, split: str, seed: int) -> list[Sample]:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test' (got {split!r})")
        source = self.test_dataset if split == "test" and self.test_dataset is not None else self.dataset
        if self.test_dataset is not None:
            rows = self._rows if split == "train" else read_rows(self.test_dataset, self.limit)
        else:
            cut = len(self._rows) - math.floor(len(self._rows) * self.test_fraction)
            rows = self._rows[:cut] if split == "train" else self._rows[cut:]
        out = []
        for i, row in enumerate(rows):
            try:
                messages = chat_messages(row["responses_create_params"].get("input"))
                tools = self._row_tools(row)
            except DataError as exc:
                raise DataError(f"{source} row {i}: {exc}") from None
            if self.system and not any(m["role"] == "system" for m in messages):
                messages.insert(0, {"role": "system", "content": self.system})
            out.append(Sample(id=f"http/{split}/{i}", messages=messages, answer=row, info={"tools": tools}))
        return out

    async def reset(self, sample: Sample) -> Episode:
        state: dict[str, Any] = {"cookies": {}, "output": [], "done": False, "failure": None}
        episode = Episode(sample=sample, messages=[dict(m) for m in sample.messages], state=state)
        await self._post(episode, "/seed_session", sample.answer, self.timeout_s)
        handlers = [Tool(t["function"]["name"], t["function"]["description"], t["function"]["parameters"],
                         self._tool_handler(episode, t["function"]["name"])) for t in sample.info["tools"]]
        # the HTTP timeout fires first, so a slow server is an HttpFailure rather than a tool error
        state["toolbox"] = ToolBox(handlers, timeout_s=self.tool_timeout_s + 5.0,
                                   max_output_chars=self.max_output_chars)
        return episode

    async def step(self, episode: Episode, turn: AssistantTurn) -> Observation:
        state = episode.state
        call_ids = self._record_turn(state["output"], turn)
        if not (turn.tool_calls or turn.tool_call_errors):
            return await self._verify(episode)
        results = await state["toolbox"].run(turn)
        if state["failure"]:
            return ended(ScoreKind.ENV_ERROR, state["failure"])
        answers = results.messages[len(turn.tool_call_errors):]  # one per call, in call order
        for cid, message in zip(call_ids, answers):
            state["output"].append({"id": _id("fco"), "type": "function_call_output", "call_id": cid,
                                    "output": message["content"], "status": "completed"})
        metrics = {"tool_calls": float(results.calls), "tool_errors": float(len(results.errors))}
        if state["done"]:
            return await self._verify(episode, metrics)
        return Observation(results.messages, metrics=metrics, errors=tuple(results.errors))

    def gold_episode(self, sample: Sample) -> None:
        """NeMo-Gym rows carry no scripted solution."""
        return None

    def _tool_handler(self, episode: Episode, name: str) -> Any:
        async def handler(arguments: dict[str, Any]) -> str:
            status, body = await self._request(episode, f"/{name}", arguments, self.tool_timeout_s)
            if status >= 500:
                episode.state["failure"] = f"POST /{name} answered {status}: {body[:200]}"
                raise HttpFailure(episode.state["failure"])
            if self.done_flag:
                episode.state["done"] |= _done(body)
            if status >= 400:
                raise ToolError(f"{name} answered {status}: {body}")
            return body
        return handler

    async def _verify(self, episode: Episode, metrics: dict[str, float] | None = None) -> Observation:
        metrics = metrics or {"tool_calls": 0.0, "tool_errors": 0.0}  # every episode reports both
        row = episode.sample.answer
        response = {"id": _id("resp"), "object": "response", "created_at": time.time(), "model": self.model_name,
                    "output": episode.state["output"], "parallel_tool_calls": True, "tool_choice": "auto",
                    "tools": row["responses_create_params"].get("tools") or [], "status": "completed"}
        reply = await self._post(episode, "/verify", {**row, "response": response}, self.timeout_s)
        if not isinstance(reply, dict):
            return ended(ScoreKind.ENV_ERROR, f"/verify answered a {type(reply).__name__}, not an object")
        if reply.get("mask_sample") is True:  # the server says its own infrastructure failed
            reason = str(reply.get("failure_reason") or reply.get("failure_kind") or "mask_sample")
            return Observation(done=True, metrics=metrics,
                               score=Score.failed(ScoreKind.INFRA, f"/verify masked the sample: {reason[:200]}"))
        reward = reply.get("reward")
        if not isinstance(reward, (int, float)) or isinstance(reward, bool) or not math.isfinite(reward):
            return ended(ScoreKind.ENV_ERROR, f"/verify answered no finite 'reward' (got {str(reward)[:40]})")
        # numeric fields (bools too: NeMo-Gym servers report accuracy flags) become score metrics
        extra = {k: float(v) for k, v in reply.items()
                 if k not in ("reward", "mask_sample") and isinstance(v, (int, float)) and math.isfinite(float(v))}
        return Observation(done=True, score=Score(float(reward), dict(list(extra.items())[:16])), metrics=metrics)

    async def _post(self, episode: Episode, path: str, body: Any, timeout: float) -> Any:
        """POST and parse a JSON reply; any failure raises (step_safely ends the episode as env_error)."""
        status, text = await self._request(episode, path, body, timeout)
        if status >= 300:
            raise HttpFailure(f"POST {path} answered {status}: {text[:200]}")
        try:
            return json.loads(text) if text.strip() else {}
        except ValueError:
            raise HttpFailure(f"POST {path} answered text that is not JSON: {text[:100]!r}") from None

    async def _request(self, episode: Episode, path: str, body: Any, timeout: float) -> tuple[int, str]:
        """(status, body text) of one POST carrying the episode's cookies; keeps the cookies it sets."""
        import aiohttp

        cookies = episode.state["cookies"]
        headers = {"Cookie": "; ".join(f"{k}={v}" for k, v in cookies.items())} if cookies else {}
        try:
            async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(),
                                             timeout=aiohttp.ClientTimeout(total=timeout)) as session:
                async with session.post(self.base_url + path, json=body, headers=headers) as reply:
                    data = await reply.content.read(MAX_REPLY_BYTES + 1)
                    if len(data) > MAX_REPLY_BYTES:
                        raise HttpFailure(f"POST {path}: reply over {MAX_REPLY_BYTES} bytes")
                    cookies.update({k: morsel.value for k, morsel in reply.cookies.items()})
                    return reply.status, data.decode("utf-8", errors="replace")
        except HttpFailure as exc:
            episode.state["failure"] = str(exc)
            raise
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            episode.state["failure"] = f"POST {path} failed: {type(exc).__name__}: {str(exc)[:200]}"
            raise HttpFailure(episode.state["failure"]) from None

    @staticmethod
    def _record_turn(output: list[dict[str, Any]], turn: AssistantTurn) -> list[str]:
        """The turn as Responses-API output items (reasoning, the message, its function calls); the calls' ids."""
        if turn.reasoning:
            output.append({"id": _id("rs"), "type": "reasoning", "summary": [{"type": "summary_text",
                                                                               "text": turn.reasoning}]})
        if turn.content.strip():
            output.append({"id": _id("msg"), "type": "message", "role": "assistant", "status": "completed",
                           "content": [{"type": "output_text", "text": turn.content, "annotations": []}]})
        ids = [_id("call") for _ in turn.tool_calls]
        for call, cid in zip(turn.tool_calls, ids):
            output.append({"id": _id("fc"), "type": "function_call", "call_id": cid, "name": call.name,
                           "arguments": json.dumps(call.arguments), "status": "completed"})
        return ids


def _done(body: str) -> bool:
    try:
        parsed = json.loads(body)
    except ValueError:
        return False
    return isinstance(parsed, dict) and bool(parsed.get("done"))


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"
