"""Proof that multi-turn tool use is learnt: SmolLM2-135M, SFT warm start on the shipped tool traces, RL on
``python_tool``; held-out 4-digit multiplication with the tool vs the same model answering without it.

    .venv/bin/python bench/multiturn_tools.py [--minutes 30] [--sft-limit 64] [--eval-prompts 100]
                                              [--out runs/bench-multiturn-tools] [--skip-sft] [key=value ...]

Phases, each through the real entry points (nothing re-implemented):
  (a) SFT   ``python -m posttrain.sft --config configs/sft/smollm2_tool_traces.yaml`` (``posttrain:tool_traces``)
  (b) eval  greedy, on ``python_tool``'s held-out 4-digit products (``digits=[4, 4]``, no word problems):
            WITH the tool: episodes (``posttrain.rlvr.evaluate`` -> ``rollout.episodes``), the RL config's
            generation and ``episodes:`` limits; WITHOUT it: the same model, the same problems in one turn,
            no tools and a system prompt asking for the number in ``\\boxed{}``, checked by the same
            verifier call (``python_tool``'s final-answer check). Also: the share of well-formed tool calls
            (of all ``<tool_call>`` blocks written) and of episodes that call the tool.
  (c) RL    ``posttrain.rlvr.loop.main`` on ``configs/rlvr/smollm2_python_tool.yaml`` from the SFT model,
            ``run.max_minutes=--minutes`` (extra ``key=value`` arguments override that config); the loop
            also evaluates before and after on its own test split (4-6 digits and word problems)
  (d) eval  as (b), on the RL model.
The base model (no SFT, no RL) gets the same eval as a first column (``--no-base`` skips it).
Each eval runs in its own process (an in-process vLLM engine, gone when it ends). Prints one table,
before and after side by side, the time of every phase, and the target line: with-tool accuracy after
RL >= 50% where the no-tool baseline is < 5%. ``--skip-sft`` reuses ``OUT/sft/model``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from worker_result import publish, run_worker  # noqa: E402

BASE_MODEL = "smollm2-135m-instruct"
SFT_CONFIG = "configs/sft/smollm2_tool_traces.yaml"
RL_CONFIG = "configs/rlvr/smollm2_python_tool.yaml"
EVAL_OPTIONS = {"digits": [4, 4], "word_problems": 0.0}  # the target's problems: 4-digit x 4-digit products
NO_TOOL_SYSTEM = "Solve the problem yourself, without tools. Put the final answer within \\boxed{}."
TARGET_WITH, TARGET_WITHOUT = 0.50, 0.05
ROWS = (("with tool: accuracy", "with_tool"), ("without tool: accuracy", "no_tool"),
        ("well-formed tool calls", "well_formed_calls"), ("episodes calling the tool", "called_tool"),
        ("turns per episode", "turns_mean"), ("tool errors per episode", "step_errors_mean"))


# --------------------------------------------------------------------------- evaluation (worker process)


def _no_tool_env(tool_env: Any) -> Any:
    from posttrain.environments.registry import with_default_hooks

    return with_default_hooks(NoToolEnv(tool_env), NoToolEnv.name)


class NoToolEnv:
    """``python_tool``'s test problems as a single-turn environment: no tools, a direct-answer system
    prompt, and the final answer checked by ``python_tool`` itself (its verifier on ``\\boxed{}``)."""

    name = "no_tool"
    eval_metrics = ()

    def __init__(self, tool_env: Any) -> None:
        self.tool_env = tool_env

    def samples(self, split: str, seed: int) -> list[Any]:
        from dataclasses import replace

        from posttrain.environments.base import user_prompt

        return [replace(s, messages=user_prompt(s.messages[-1]["content"], NO_TOOL_SYSTEM))
                for s in self.tool_env.samples(split, seed)]

    async def score(self, sample: Any, completion: str) -> Any:
        from posttrain.environments.multiturn import AssistantTurn, Episode

        obs = await self.tool_env.step(Episode(sample, []), AssistantTurn(content=completion, reasoning=None))
        return obs.score  # a turn without a tool call always ends the episode with a score


class LocalEngines:
    """One in-process rollout engine with the interface ``evaluate`` uses (``generate`` and ``play``);
    keeps every episode it played so the tool-call counts can be read per episode."""

    def __init__(self, model_dir: str, rollout: Any) -> None:
        from posttrain.config import ModelConfig
        from posttrain.rollout.engine import RolloutEngine

        self.model = ModelConfig(name=model_dir)
        self.engine = RolloutEngine(self.model, rollout)
        self.episodes: list[Any] = []

    def generate(self, prompts: list[Any], gen: Any, n: int) -> list[list[Any]]:
        return self.engine.generate(prompts, gen, n)

    def play(self, jobs: list[Any], gen: Any, n: int, limits: Any) -> list[list[list[Any]]]:
        from posttrain.rollout.episodes import Dispatcher, play_jobs

        played = asyncio.run(play_jobs(jobs, n, Dispatcher.in_process(self.engine, gen), self.engine.tokenizer,
                                       gen, limits, self.engine.cfg.max_model_len))
        self.episodes += [e for job in played for sample in job for e in sample]
        return played


def evaluate_model(model_dir: str, n_prompts: int, rl_config: str, seed: int = 0) -> dict[str, Any]:
    """Greedy held-out accuracy of ``model_dir`` with and without the tool, and its tool-call form."""
    from posttrain.config import load_config
    from posttrain.environments.python_tool_env import PythonToolEnv
    from posttrain.rlvr.config import RLVRConfig
    from posttrain.rlvr.evaluate import evaluate

    cfg = load_config(RLVRConfig, rl_config, [])
    options = {**cfg.environments[0].options, **EVAL_OPTIONS, "test_size": n_prompts}
    tool_env = PythonToolEnv(**options)
    start = time.monotonic()
    try:
        engines = LocalEngines(model_dir, cfg.rollout.model_copy(update={"num_engines": 1}))
        kw = dict(concurrency=cfg.run.score_concurrency, timeout=cfg.run.score_timeout_s)
        with_tool = evaluate(engines, {"python_tool": tool_env}, cfg.generation, n_prompts, seed,
                             episodes=cfg.episodes, **kw)
        no_tool = evaluate(engines, {"no_tool": _no_tool_env(tool_env)}, cfg.generation, n_prompts, seed, **kw)
        engines.engine.shutdown()
    finally:
        tool_env.close()
    eps = engines.episodes
    calls, malformed = sum(e.tool_calls for e in eps), sum(e.tool_call_errors for e in eps)
    return {"model": model_dir, "prompts": len(eps), "with_tool": with_tool["eval/python_tool/accuracy"],
            "no_tool": no_tool["eval/no_tool/accuracy"],
            "well_formed_calls": calls / (calls + malformed) if calls + malformed else None,  # none written: "-"
            "called_tool": sum(e.tool_calls > 0 for e in eps) / max(len(eps), 1),
            "turns_mean": sum(e.turns for e in eps) / max(len(eps), 1),
            "step_errors_mean": sum(e.step_errors for e in eps) / max(len(eps), 1),
            "seconds": round(time.monotonic() - start, 1)}


# --------------------------------------------------------------------------- phases (driver)


def check_tools_rendered(sft_config: str) -> None:
    """Stop before training if the SFT data path would drop the traces' ``tools`` (the warm start would
    then learn a system turn the environment never shows)."""
    from posttrain import models
    from posttrain.config import load_config
    from posttrain.sft import data
    from posttrain.sft.config import SFTConfig

    cfg = load_config(SFTConfig, sft_config, ["data.limit=1"])
    tokenizer = models.tokenizer_for(cfg.model)
    sample = data.build(cfg.data, tokenizer, cfg.train.micro_batch_tokens).samples[0]
    if "<tools>" not in tokenizer.decode(sample.input_ids):
        raise SystemExit(f"{cfg.data.path}: the SFT data path renders the traces without their tools; it must "
                         "pass each row's `tools` column to the chat template (posttrain/sft/data.py)")


def run_sft(args: argparse.Namespace, out: Path) -> Path:
    check_tools_rendered(args.sft_config)
    cmd = [sys.executable, "-m", "posttrain.sft", "--config", args.sft_config, f"run_dir={out / 'sft'}",
           f"data.limit={args.sft_limit}", "progress=false"]
    print("SFT:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return out / "sft" / "model"


def run_eval(args: argparse.Namespace, model: Path, label: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--eval-model", str(model), "--eval-prompts", str(args.eval_prompts),
           "--rl-config", args.rl_config]
    print(f"eval ({label}):", " ".join(cmd), flush=True)
    return run_worker(cmd, {"model": str(model)}, timeout=args.eval_timeout)


def run_rl(args: argparse.Namespace, out: Path, model: Path) -> tuple[Path, dict[str, Any]]:
    from posttrain.config import load_config
    from posttrain.rlvr.config import RLVRConfig
    from posttrain.rlvr.loop import main

    run_dir = out / "rl"
    if run_dir.exists():  # the bench's own folder: a fresh RL run each time
        shutil.rmtree(run_dir)
    cfg = load_config(RLVRConfig, args.rl_config, [f"init_from={model}", f"run_dir={run_dir}",
                                                   f"run.max_minutes={args.minutes}", "run.steps=100000",
                                                   "run.eval_every=1000000", f"run.eval_prompts={args.eval_prompts}",
                                                   *args.overrides])
    main(cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/mean" in r]
    reward = [r["reward/mean"] for r in steps]
    k = max(1, len(reward) // 4)
    evals = [r for r in rows if "eval/python_tool/accuracy" in r]
    mix = {"before": evals[0]["eval/python_tool/accuracy"], "after": evals[-1]["eval/python_tool/accuracy"]} if evals else {}
    return run_dir / "model", {"steps": len(steps), "reward_first": sum(reward[:k]) / k if reward else 0.0,
                               "reward_last": sum(reward[-k:]) / k if reward else 0.0, "eval_mix": mix}


def table(results: dict[str, dict[str, Any]], times: dict[str, float], rl: dict[str, Any]) -> str:
    def cell(row: dict[str, Any], key: str) -> str:
        value = row.get(key)
        if isinstance(value, int):
            return f"{value:10d}"
        return f"{value:10.3f}" if isinstance(value, float) else f"{'-':>10s}"

    cols = list(results)
    lines = [f"{'held-out 4-digit products':28s} " + " ".join(f"{c:>10s}" for c in cols)]
    for label, key in (*ROWS, ("prompts", "prompts")):
        lines.append(f"{label:28s} " + " ".join(cell(results[c], key) for c in cols))
    mix = rl.get("eval_mix", {})
    if mix:  # the RL loop's own evals, on python_tool's test split as configured (4-6 digits, word problems)
        lines.append(f"{'with tool, RL env test mix':28s} " + " ".join(
            cell(mix, {"before RL": "before", "after RL": "after"}.get(c, "")) for c in cols))
    lines.append("phases: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items())
                 + f"; RL {rl.get('steps', 0)} steps, train reward {rl.get('reward_first', 0):.2f} (first quarter) -> "
                 f"{rl.get('reward_last', 0):.2f} (last quarter)")
    for name, row in results.items():
        if "error" in row:
            lines.append(f"eval {name} failed: {row['error']}")
    after = results.get("after RL", {})
    with_after, without = after.get("with_tool"), after.get("no_tool")
    met = (isinstance(with_after, float) and isinstance(without, float) and with_after >= TARGET_WITH
           and without < TARGET_WITHOUT)
    lines.append(f"target: with-tool accuracy after RL >= {TARGET_WITH:.0%} where no-tool < {TARGET_WITHOUT:.0%}: "
                 f"{'MET' if met else 'MISSED'} (with tool {with_after}, without {without})")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}

    def timed(name: str, fn: Any, *a: Any) -> Any:
        start = time.monotonic()
        try:
            return fn(*a)
        finally:
            times[name] = time.monotonic() - start

    results: dict[str, dict[str, Any]] = {}
    if not args.no_base:
        results["base model"] = timed("eval base", run_eval, args, BASE_MODEL, "base model, no SFT")
    if args.skip_sft:
        sft_model = out / "sft" / "model"
        if not (sft_model / "config.json").exists():
            raise SystemExit(f"--skip-sft: no SFT model in {sft_model}; run once without --skip-sft")
    else:
        sft_model = timed("sft", run_sft, args, out)
    results["before RL"] = timed("eval before", run_eval, args, sft_model, "before RL")
    rl_model, rl = timed("rl", run_rl, args, out, sft_model)
    results["after RL"] = timed("eval after", run_eval, args, rl_model, "after RL")
    print(f"\nMulti-turn tool use: SmolLM2-135M-Instruct, SFT on {args.sft_limit} traces, RL on python_tool "
          f"for {args.minutes:g} min (this machine: {os.cpu_count()} CPUs)")
    publish(table(results, times, rl), [*({"column": k, **v} for k, v in results.items()),
                                        {"column": "rl", **rl, "times_s": times}], args.json)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the RL config")
    parser.add_argument("--minutes", type=float, default=30.0, help="RL wall time (run.max_minutes)")
    parser.add_argument("--sft-limit", type=int, default=64, help="tool traces in the SFT warm start")
    parser.add_argument("--eval-prompts", type=int, default=100, help="held-out problems per eval")
    parser.add_argument("--out", default="runs/bench-multiturn-tools")
    parser.add_argument("--skip-sft", action="store_true", help="reuse OUT/sft/model")
    parser.add_argument("--no-base", action="store_true", help="skip the base model's column (no SFT, no RL)")
    parser.add_argument("--sft-config", default=SFT_CONFIG)
    parser.add_argument("--rl-config", default=RL_CONFIG)
    parser.add_argument("--eval-timeout", type=float, default=1800.0, help="seconds one eval may take")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--eval-model", help=argparse.SUPPRESS)  # worker mode: evaluate this model, print RESULT
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.eval_model:
        print("RESULT " + json.dumps(evaluate_model(args.eval_model, args.eval_prompts, args.rl_config)), flush=True)
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
