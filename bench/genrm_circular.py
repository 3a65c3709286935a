"""GenRM comparison graphs and aggregation rules against a simulated judge of known noise.

Each rollout has a true quality q ~ N(0, 1). Per call the judge perceives q + noise (fresh
noise each call), sees the response shown first as better by ``--bias``, and answers integer
helpfulness round(3 + perceived + leniency) clipped to 1-5 (leniency ~ N(0, ``--offset``) per
call, shared by both scores) and a ranking 1-6 from the perceived difference (cut at 0,
+-0.4, +-1.0); ``--fail`` of the calls do not parse (3 / 3 / 3.5).
For every mode (circular, k_neighbours k=2, all_pairs), orientation (fixed or shuffled) and
noise level, the same judge answers feed every aggregation rule of posttrain.genrm.circular;
reported: judge calls per group, mean Kendall tau-b of rewards vs true quality, and top-1
(the truly best rollout gets the highest reward; reward ties share the credit).

    python bench/genrm_circular.py                  # N=16, 2000 groups, low/medium/high noise
    python bench/genrm_circular.py --n 16 8 --groups 500 --bias 0.4 --fail 0.1
    python bench/genrm_circular.py --real-judge tiny-llama --real-prompts 4   # + a timed real judge step

``--real-judge MODEL`` also times one real judge step: the ``genrm`` environment with MODEL as a
local GenRM on a vLLM engine scores ``--real-prompts`` groups of N rollouts, circular vs
all_pairs, every comparison of the step in one batched generation.
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np

from posttrain.genrm.circular import RULES, aggregate, orient, pairs, position_bias
from posttrain.genrm.judge_format import FALLBACK, Judgement

NOISE = {"low": 0.3, "medium": 1.0, "high": 2.0}
RANK_CUTS = np.array([1.0, 0.4, 0.0, -0.4, -1.0])  # perceived difference above cut k -> ranking k+1
MODES = [("circular", 1), ("k_neighbours", 2), ("all_pairs", 0)]


def judge(q: np.ndarray, shown: list[tuple[int, int]], noise: float, bias: float, offset: float,
          fail: float, rng: np.random.Generator) -> list[Judgement]:
    """Simulated judgements of the ``shown`` pairs of one group of true qualities ``q``."""
    first = np.array([a for a, _ in shown])
    second = np.array([b for _, b in shown])
    p1 = q[first] + bias / 2 + noise * rng.standard_normal(len(shown))
    p2 = q[second] - bias / 2 + noise * rng.standard_normal(len(shown))
    drift = offset * rng.standard_normal(len(shown))  # this call's leniency: both scores, not the ranking
    s1 = np.clip(np.rint(3 + p1 + drift), 1, 5)
    s2 = np.clip(np.rint(3 + p2 + drift), 1, 5)
    ranking = 1 + (p1 - p2 <= RANK_CUTS[:, None]).sum(axis=0)
    failed = rng.random(len(shown)) < fail
    return [FALLBACK if bad else Judgement(float(a), float(b), float(r), parsed=True)
            for a, b, r, bad in zip(s1, s2, ranking, failed)]


def kendall_tau_b(rewards: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Tau-b per row of [G, n] arrays (reward ties handled; q has none); 0 where all rewards tie."""
    i, j = np.triu_indices(rewards.shape[1], 1)
    sr = np.sign(rewards[:, i] - rewards[:, j])
    sq = np.sign(q[:, i] - q[:, j])
    denom = np.sqrt((sr != 0).sum(axis=1) * (sq != 0).sum(axis=1))  # sqrt((n0 - n1)(n0 - n2))
    return (sr * sq).sum(axis=1) / np.where(denom > 0, denom, np.inf)


def top1(rewards: np.ndarray, q: np.ndarray) -> np.ndarray:
    """1 when the truly best rollout holds the highest reward, 1/k when k rollouts share it."""
    at_max = rewards == rewards.max(axis=1, keepdims=True)
    best = q.argmax(axis=1)
    return at_max[np.arange(len(q)), best] / at_max.sum(axis=1)


def run(n: int, groups: int, noise: float, bias: float, offset: float, fail: float, seed: int) -> dict:
    """{(mode, shuffled): (calls, {rule: (tau, top1)}), "bias": measured position bias}."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((groups, n))
    out: dict = {}
    for mode, k in MODES:
        base = pairs(n, mode, k=max(k, 1))
        for shuffled in (False, True):
            flip = random.Random(seed)
            rewards = {rule: np.zeros((groups, n)) for rule in RULES}
            biases = []
            for g in range(groups):
                shown = orient(base, flip) if shuffled else base
                judgements = judge(q[g], shown, noise, bias, offset, fail, rng)
                biases.append(position_bias(shown, judgements))
                for rule in RULES:
                    rewards[rule][g] = aggregate(n, shown, judgements, rule=rule)
            scores = {}
            for rule in RULES:
                r = np.round(rewards[rule], 9)  # equal sums reached by different float paths tie
                scores[rule] = (kendall_tau_b(r, q).mean(), top1(r, q).mean())
            out[(mode, shuffled)] = (len(base), scores)
            out["bias"] = float(np.nanmean(biases))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[16], help="rollouts per group")
    parser.add_argument("--groups", type=int, default=2000, help="simulated groups per setting")
    parser.add_argument("--bias", type=float, default=0.2, help="judge's preference for position 1 (quality units)")
    parser.add_argument("--offset", type=float, default=0.5,
                        help="sd of a per-call leniency shift of both scores (cancels in the ranking)")
    parser.add_argument("--fail", type=float, default=0.02, help="fraction of judge answers that do not parse")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--real-judge", help="also time a real judge step with this model (e.g. tiny-llama)")
    parser.add_argument("--real-prompts", type=int, default=4, help="groups in the real judge step")
    args = parser.parse_args()
    if args.real_judge:
        real_judge_step(args.real_judge, args.n[0], args.real_prompts)

    start = time.perf_counter()
    head = "  ".join(f"{rule:>15}" for rule in RULES)
    print(f"judge: noise sd {NOISE}, position bias {args.bias}, leniency sd {args.offset}, "
          f"parse failures {args.fail:.0%}, "
          f"{args.groups} groups; cells = Kendall tau-b / top-1")
    for n in args.n:
        print(f"\nN={n}\n{'noise':<7}{'mode':<14}{'order':<9}{'calls':>6}  {head}")
        for level, sd in NOISE.items():
            result = run(n, args.groups, sd, args.bias, args.offset, args.fail, args.seed)
            for mode, _ in MODES:
                for shuffled in (False, True):
                    calls, scores = result[(mode, shuffled)]
                    best = max(scores, key=lambda rule: scores[rule][0])
                    cells = "  ".join(f"{scores[r][0]:.3f}/{scores[r][1]:.3f}{'*' if r == best else ' ':>5}"
                                      for r in RULES)
                    print(f"{level:<7}{mode:<14}{'shuffled' if shuffled else 'fixed':<9}{calls:>6}  {cells}")
            print(f"{'':<7}(judge preferred position 1 in {result['bias']:.1%} of parsed shuffled all_pairs calls)")
    print(f"\n* = best tau in the row; {time.perf_counter() - start:.1f} s")


def real_judge_step(model: str, n: int, prompts: int) -> None:
    """Wall time of one step's judging on a real engine: circular (N calls per group) vs all pairs."""
    import asyncio

    from posttrain.environments.base import Completion, StageResources
    from posttrain.genrm.environment import GenRMEnv

    judge = {"model": model, "max_tokens": 32, "temperature": 1.0, "enable_thinking": False}
    print(f"\nreal judge step: {model} on one vLLM engine, {prompts} prompts x {n} rollouts")
    print(f"{'mode':<12}{'calls':>7}{'seconds':>9}{'calls/s':>9}{'parse fail':>11}")
    for mode in ("circular", "all_pairs"):
        env = GenRMEnv(judge=judge, mode=mode, size=prompts, judge_rollout={"max_model_len": 1024})
        samples = env.samples("train", 0)[:prompts]
        groups = [[Completion(f"Answer {i}: the result is {i * 7 % 23}.") for i in range(n)] for _ in samples]
        try:
            env.start(StageResources())
            start = time.perf_counter()
            scores = asyncio.run(env.score_groups(samples, groups))
            seconds = time.perf_counter() - start
        finally:
            env.close()
        calls = int(scores[0][0].metrics["calls"])
        print(f"{mode:<12}{calls:>7}{seconds:>9.2f}{calls / seconds:>9.1f}{scores[0][0].metrics['parse_failure_rate']:>11.2f}")


if __name__ == "__main__":
    main()
