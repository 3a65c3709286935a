"""`posttrain report RUN_DIR [--out DIR]`: HTML/PNG report of a pipeline or stage run folder."""

from __future__ import annotations

import argparse
from typing import Any


def _report(args: argparse.Namespace) -> int:
    from posttrain.report import build_report, format_summary
    from posttrain.report_data import summary

    index = build_report(args.run_dir, args.out)
    print(index)
    print(format_summary(summary(args.run_dir)))
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("report", help="HTML report (plots, before/after eval table) of a run folder")
    p.add_argument("run_dir", metavar="RUN_DIR", help="pipeline run folder (sft/ rlvr/ rlhf/ inside) or one stage's")
    p.add_argument("--out", default=None, metavar="DIR", help="report folder (default: RUN_DIR/report)")
    p.set_defaults(func=_report)
