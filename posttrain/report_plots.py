"""PNG figures of the run report: one panel per stage, one line per environment or phase.

Figures are drawn on ``matplotlib.figure.Figure`` (Agg canvas, no pyplot): no display and no global
backend switch for whoever imported us. A figure whose metrics no stage logged is not drawn.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from posttrain.report_data import Stage, before_after

Match = Callable[[str], bool]
PHASE_ORDER: tuple[str, ...] = ("time/gen_s", "time/score_s", "time/train_s", "time/sync_s")
_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")


def _env_key(metric: str) -> Match:
    """``env/<env>/<metric>``-style keys: ``_env_key("reward")`` matches env/math/reward."""
    return lambda k: k.startswith("env/") and k.count("/") == 2 and k.endswith("/" + metric)


def _is_eval_accuracy(key: str) -> bool:
    return key.startswith("eval/") and key.endswith("/accuracy")


def _is_phase_time(key: str) -> bool:
    return key.startswith("time/") and key.endswith("_s")


def _is(*keys: str) -> Match:
    return lambda k: k in keys


def _label(key: str) -> str:
    """``env/math/reward`` -> ``math``; other keys stay whole."""
    return key.split("/")[1] if key.count("/") == 2 else key


def _stages_with(stages: Sequence[Stage], matches: Sequence[Match]) -> list[Stage]:
    return [s for s in stages if any(m(k) for k in s.metric_keys() for m in matches)]


def _figure(rows: int, cols: int, height: float = 3.0) -> tuple[Figure, list[list]]:
    """A rows x cols grid with fixed margins in inches (room for titles, tick and axis labels).

    Fixed margins instead of constrained layout: that costs an extra layout draw per figure.
    """
    width, total = max(7.0, min(4.4 * cols + 0.6, 14.0)), height * rows
    left, right, top, bottom, gap_w, gap_h = 0.85, 0.2, 0.35, 0.55, 0.75, 0.95  # inches
    axes_w = (width - left - right - gap_w * (cols - 1)) / cols
    axes_h = (total - top - bottom - gap_h * (rows - 1)) / rows
    fig = Figure(figsize=(width, total))
    axes = fig.subplots(rows, cols, squeeze=False, gridspec_kw={
        "left": left / width, "right": 1 - right / width, "top": 1 - top / total, "bottom": bottom / total,
        "wspace": gap_w / axes_w, "hspace": gap_h / axes_h})
    for ax in axes.flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    return fig, [list(r) for r in axes]


def line_panels(stages: Sequence[Stage], groups: Sequence[tuple[str, Match]]) -> Figure | None:
    """Rows = groups (y label, key filter) that some stage logged; columns = stages; a line per key."""
    groups = [g for g in groups if _stages_with(stages, [g[1]])]
    shown = _stages_with(stages, [m for _, m in groups])
    if not shown:
        return None
    fig, axes = _figure(len(groups), len(shown), height=3.0 if len(groups) == 1 else 2.5)
    colors: dict[str, str] = {}
    for r, (ylabel, match) in enumerate(groups):
        for c, stage in enumerate(shown):
            ax = axes[r][c]
            for key in sorted(k for k in stage.metric_keys() if match(k)):
                steps, values = stage.series(key)
                color = colors.setdefault(_label(key), _COLORS[len(colors) % len(_COLORS)])
                style = "--" if key == "reward/mean" else "-"
                ax.plot(steps, values, style, color="black" if key == "reward/mean" else color,
                        marker="o" if len(steps) <= 30 else None, markersize=3, label=_label(key))
            ax.set_title(stage.name if r == 0 else "", fontsize=10)
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel if c == 0 else "")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
            else:
                ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    return fig


def eval_bars(stages: Sequence[Stage]) -> Figure | None:
    """Before (first eval) and after (last eval) accuracy per environment, one panel per stage."""
    match = _is_eval_accuracy
    shown = _stages_with(stages, [match])
    if not shown:
        return None
    fig, axes = _figure(1, len(shown), height=3.4)
    for ax, stage in zip(axes[0], shown):
        keys = sorted(k for k in stage.metric_keys() if match(k))
        table = [before_after(stage, k) for k in keys]
        xs = range(len(keys))
        for offset, field, color in ((-0.2, "before", "#9e9e9e"), (0.2, "after", "#1f77b4")):
            heights = [ba[field] if ba[field] is not None else 0.0 for ba in table]
            bars = ax.bar([x + offset for x in xs], heights, width=0.4, color=color, label=field)
            for bar, ba in zip(bars, table):
                if ba[field] is not None:
                    ax.annotate(f"{ba[field]:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(xs), [_label(k) for k in keys])
        ax.set_ylim(0, 1.1)
        ax.set_title(stage.name, fontsize=10)
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=8)
    return fig


def step_time(stages: Sequence[Stage]) -> Figure | None:
    """Per-phase seconds of each step, stacked (bars for short runs, areas for long ones)."""
    match = _is_phase_time
    shown = _stages_with(stages, [match])
    if not shown:
        return None
    fig, axes = _figure(1, len(shown), height=3.4)
    all_phases = {k for s in shown for k in s.metric_keys() if match(k)}
    phases = [p for p in PHASE_ORDER if p in all_phases] + sorted(all_phases - set(PHASE_ORDER))
    color = {p: _COLORS[i % len(_COLORS)] for i, p in enumerate(phases)}
    for ax, stage in zip(axes[0], shown):
        mine = [p for p in phases if p in stage.metric_keys()]
        by_phase = {p: dict(zip(*stage.series(p))) for p in mine}
        steps = sorted({s for p in mine for s in by_phase[p]})
        stacks = [[by_phase[p].get(s, 0.0) for s in steps] for p in mine]
        labels = [p[len("time/"):-len("_s")] for p in mine]
        if len(steps) <= 50:
            bottom = [0.0] * len(steps)
            for p, label, values in zip(mine, labels, stacks):
                ax.bar(steps, values, bottom=bottom, color=color[p], label=label, width=0.8)
                bottom = [b + v for b, v in zip(bottom, values)]
        else:
            ax.stackplot(steps, stacks, labels=labels, colors=[color[p] for p in mine])
        ax.set_title(stage.name, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("seconds")
        ax.margins(y=0.3)  # headroom for the legend above the stacks
        ax.legend(fontsize=8, loc="upper left", ncols=len(mine))
    return fig


def _eval_over_steps(stages: Sequence[Stage]) -> Figure | None:
    """Only worth a figure when some stage evaluated more than before and after."""
    match = _is_eval_accuracy
    if not any(len(s.series(k)[0]) > 2 for s in stages for k in s.metric_keys() if match(k)):
        return None
    return line_panels(stages, [("eval accuracy", match)])


def draw_all(stages: Sequence[Stage], folder: Path) -> list[tuple[str, str]]:
    """Draw every figure some stage has data for into ``folder``; (title, file name) in page order."""
    figures: list[tuple[str, str, Callable[[], Figure | None]]] = [
        ("Reward per environment", "reward.png",
         lambda: line_panels(stages, [("reward", lambda k: _env_key("reward")(k) or k == "reward/mean")])),
        ("Eval accuracy: before / after", "eval.png", lambda: eval_bars(stages)),
        ("Eval accuracy over steps", "eval_steps.png", lambda: _eval_over_steps(stages)),
        ("Pass and error rate per environment", "pass_error.png",
         lambda: line_panels(stages, [("pass rate", _env_key("pass_rate")), ("error rate", _env_key("error_rate"))])),
        ("Reasoning and completion length", "length.png",
         lambda: line_panels(stages, [("tokens", _is("rollout/reasoning_tokens_mean",
                                                     "rollout/completion_tokens_mean"))])),
        ("GenRM reward", "genrm.png",
         lambda: line_panels(stages, [("GenRM reward", _is("genrm/reward_mean", "env/genrm/raw_reward")),
                                      ("position-1 preference",
                                       _is("genrm/position1_preference", "env/genrm/position1_preference"))])),
        ("Step time per phase", "step_time.png", lambda: step_time(stages)),
        ("SFT training", "sft.png",
         lambda: line_panels(stages, [("loss", _is("train/loss")), ("learning rate", _is("train/lr")),
                                      ("tokens/s", _is("train/tokens_per_s"))])),
    ]
    drawn = []
    for title, name, draw in figures:
        fig = draw()
        if fig is not None:
            fig.savefig(folder / name, dpi=90)
            drawn.append((title, name))
    return drawn
