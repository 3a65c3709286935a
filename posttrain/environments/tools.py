"""Tool calls of one assistant turn -> ``tool`` messages, for environments that offer tools.

A :class:`ToolBox` holds named tools (an OpenAI-style schema and an async handler) and answers
every call of a turn, in order, with one ``tool`` message. The model's calls are hostile input:
an unknown name, arguments that break the tool's JSON schema, a handler that raises or hangs
(per-call timeout), a flood of output (cut with a marker) and a malformed ``<tool_call>`` block
each become an ``error: ...`` message the model reads next turn, plus a counted error -- never
an exception out of :meth:`ToolBox.run`. ``python_tool`` and ``http`` use it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from posttrain.environments.multiturn import AssistantTurn, ToolCall
from posttrain.verifiers.code import truncated as truncate  # one marker for sandbox output and tool answers

Handler = Callable[[dict[str, Any]], Awaitable[str]]


class ToolError(Exception):
    """Raised by a handler for a failure the model caused (bad input to the tool): its message is
    shown as ``error: <message>``, and it counts as an error of the turn."""


@dataclass(frozen=True)
class Tool:
    """One tool: what the model is told (name, description, JSON schema of the arguments) and the
    coroutine that answers a call with the text the model sees."""

    name: str
    description: str
    parameters: dict[str, Any]
    handler: Handler

    def schema(self) -> dict[str, Any]:
        """The OpenAI function schema the chat template renders into the system turn."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass
class ToolResults:
    """The answer to one turn's calls: ``messages`` in call order (malformed blocks first)."""

    messages: list[dict[str, str]] = field(default_factory=list)
    calls: int = 0  # well-formed calls answered (whether or not they failed)
    errors: list[str] = field(default_factory=list)  # one line per failed or malformed call


def argument_problem(validator: Any, arguments: Any) -> str | None:
    """Why ``arguments`` break the tool's schema (the first error, with its path), or None."""
    if not isinstance(arguments, dict):
        return f"arguments must be a JSON object, got {type(arguments).__name__}"
    try:
        error = next(iter(validator.iter_errors(arguments)), None)
    except Exception as exc:  # noqa: BLE001 - hostile arguments (absurd nesting) must not crash a turn
        return f"arguments could not be checked ({type(exc).__name__})"
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path)
    return (f"at '{where}': " if where else "") + error.message[:300]


class ToolBox:
    """Dispatches a turn's tool calls to their handlers by name.

    ``timeout_s`` bounds each call, ``max_output_chars`` each answer, ``max_calls`` the calls
    answered per turn (the rest get an error). Calls run one after another: a stateful tool (an
    HTTP session) sees them in the order the model wrote them.
    """

    def __init__(self, tools: Sequence[Tool], *, timeout_s: float = 10.0, max_output_chars: int = 4000,
                 max_calls: int = 8) -> None:
        import jsonschema

        if timeout_s <= 0 or max_output_chars < 1 or max_calls < 1:
            raise ValueError(f"timeout_s must be > 0, max_output_chars and max_calls >= 1 (got {timeout_s}, "
                             f"{max_output_chars}, {max_calls})")
        names = [t.name for t in tools]
        if len(set(names)) != len(names):
            raise ValueError(f"tool names must be unique (got {names})")
        self.tools = {t.name: t for t in tools}
        self.timeout_s, self.max_output_chars, self.max_calls = timeout_s, max_output_chars, max_calls
        self._validators = {}
        for tool in tools:
            try:
                cls = jsonschema.validators.validator_for(tool.parameters)
                cls.check_schema(tool.parameters)
            except jsonschema.SchemaError as exc:
                raise ValueError(f"tool {tool.name!r}: parameters are not a valid JSON schema: {exc.message}") from None
            self._validators[tool.name] = cls(tool.parameters)

    def schemas(self) -> list[dict[str, Any]]:
        return [t.schema() for t in self.tools.values()]

    async def run(self, turn: AssistantTurn) -> ToolResults:
        """One ``tool`` message per malformed block and per call; never raises."""
        results = ToolResults()
        for problem in turn.tool_call_errors:
            self._error(results, "tool_call", f"malformed tool call: {problem}")
        for i, call in enumerate(turn.tool_calls):
            if i >= self.max_calls:
                self._error(results, call.name, f"too many tool calls in one turn (at most {self.max_calls}); "
                                                "this one was not run")
                continue
            results.calls += 1
            text, error = await self.call(call)
            if error:
                self._error(results, call.name, text)
            else:
                results.messages.append(self._message(call.name, text))
        return results

    async def call(self, call: ToolCall) -> tuple[str, bool]:
        """(what the model sees, whether the call failed) for one call."""
        tool = self.tools.get(call.name) if isinstance(call.name, str) else None
        if tool is None:
            known = ", ".join(self.tools) or "none"
            return f"unknown tool {str(call.name)[:60]!r}; the tools are: {known}", True
        problem = argument_problem(self._validators[tool.name], call.arguments)
        if problem:
            return f"bad arguments for {tool.name}: {problem}", True
        try:
            text = await asyncio.wait_for(tool.handler(dict(call.arguments)), self.timeout_s)
        except asyncio.TimeoutError:
            return f"{tool.name} timed out after {self.timeout_s:g}s", True
        except asyncio.CancelledError:
            raise
        except ToolError as exc:
            return str(exc)[:self.max_output_chars], True
        except Exception as exc:  # noqa: BLE001 - a tool's crash costs this call only
            return f"{tool.name} failed: {type(exc).__name__}: {str(exc)[:300]}", True
        if not isinstance(text, str):
            return f"{tool.name} failed: its handler returned a {type(text).__name__}, not text", True
        return text, False

    def _error(self, results: ToolResults, name: str, text: str) -> None:
        results.errors.append(text[:300])
        results.messages.append(self._message(name, "error: " + text))

    def _message(self, name: str, text: str) -> dict[str, str]:
        return {"role": "tool", "name": str(name)[:64], "content": truncate(text, self.max_output_chars)}
