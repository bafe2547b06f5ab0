"""The ``hidlr`` command: ``hidlr demo`` (Figure 2 of the paper), ``hidlr bench robustness``."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hidlr.experiments.splits import SPLITS


def _demo(args: argparse.Namespace) -> int:
    from hidlr.demo import run_figure2, save_figure2

    results = run_figure2(iterations=args.iterations)
    print(f"{'function':<18} {'method':<8} {'final loss':>12}  {'rate':>9}  end point")
    for name, traces in results.items():
        for t in traces:
            rate = f"{t.lr:9.1e}" if t.lr else "  adapted"
            end = f"({t.path[-1][0]:.6f}, {t.path[-1][1]:.6f})"
            print(f"{name:<18} {t.method:<8} {t.final:12.4e}  {rate}  {end}")
    if not args.no_plot:
        path = save_figure2(results, Path(args.out) / "figure2.png")
        print(f"figure: {path}")
    return 0


def _bench_greedy(args: argparse.Namespace) -> int:
    from hidlr.experiments.greedy import format_trace, greedy_multipliers
    from hidlr.experiments.tasks import TASKS

    if args.task not in TASKS:
        print(f"unknown task {args.task!r}; tasks are: {', '.join(TASKS)}", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(1)
    print(
        format_trace(
            greedy_multipliers(TASKS[args.task], args.lr, seed=args.seed, every=args.every)
        )
    )
    return 0


def _bench_robustness(args: argparse.Namespace) -> int:
    import json

    from hidlr.experiments.robustness import (
        SettingsMismatch,
        format_summary,
        run_benchmark,
        summarize,
    )
    from hidlr.experiments.tasks import TASKS

    tasks = args.tasks or [n for n, t in TASKS.items() if args.split in ("all", t.split)]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        print(f"unknown task(s) {unknown}; tasks are: {', '.join(TASKS)}", file=sys.stderr)
        return 2
    missing = [n for n in tasks if not TASKS[n].available()]
    if missing:  # real data that is not installed: say so, run the rest
        print(f"left out, their data is not installed: {', '.join(missing)}", file=sys.stderr)
        tasks = [n for n in tasks if n not in missing]
        if not tasks:
            return 2

    def progress(i: int, total: int, record: dict) -> None:
        print(
            f"\r[{i}/{total}] {record['task']} {record['method']} seed={record['seed']} "
            f"val={record['val_loss']:.4g}".ljust(79),
            end="" if i < total else "\n",
            flush=True,
        )

    try:
        path = run_benchmark(
            args.out,
            tasks=tasks,
            seeds=tuple(range(args.seeds)),
            sweep=not args.no_sweep,
            steps_scale=args.steps_scale,
            probe_batch=args.probe_batch,
            schedule=args.schedule,
            hidlr_options={"policy": args.policy} if args.policy != "robust" else None,
            workers=args.workers,
            reuse=args.reuse,
            progress=progress,
        )
    except SettingsMismatch as err:  # a results folder made with other settings
        print(err, file=sys.stderr)
        return 2
    summary = summarize(path)
    (path.parent / "summary.json").write_text(json.dumps(summary, indent=1))
    text = format_summary(summary)
    (path.parent / "summary.txt").write_text(text + "\n")
    print(text)
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from hidlr.experiments.paper import EXPERIMENTS
    from hidlr.experiments.report import build_report, claims_table
    from hidlr.experiments.results import SettingsMismatch, run_specs

    names = args.only or list(EXPERIMENTS)
    unknown = sorted(set(names) - set(EXPERIMENTS))
    if unknown:
        print(
            f"unknown experiment(s) {unknown}; experiments are: {', '.join(EXPERIMENTS)}",
            file=sys.stderr,
        )
        return 2
    for name in names:
        exp = EXPERIMENTS[name]
        missing = exp.requires()
        if missing is not None:
            print(f"{name}: skipped, it needs what is not installed: {missing}")
            continue
        specs = exp.specs(args.quick, args.seeds)

        def progress(i: int, total: int, spec: object, skipped: bool, name: str = name) -> None:
            bar = "#" * (20 * i // total)
            state = "done earlier" if skipped else "ran"
            print(
                f"\r{name:<16} [{bar:<20}] {i}/{total} {state}".ljust(79),
                end="" if i < total else "\n",
                flush=True,
            )

        try:
            run_specs(specs, args.out, exp.run, progress)
        except SettingsMismatch as err:  # e.g. a full run into a folder of quick results
            print(f"\n{err}", file=sys.stderr)
            return 2
    path = build_report(args.out)
    print(claims_table(path.read_text()))
    print(f"report: {path}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from hidlr.experiments.report import build_report

    try:
        print(f"report: {build_report(args.results)}")
    except FileNotFoundError as err:
        print(err, file=sys.stderr)
        return 2
    return 0


def _bench_overhead(args: argparse.Namespace) -> int:
    from hidlr.experiments.overhead import run_overhead
    from hidlr.experiments.overhead_report import format_overhead

    result = run_overhead(
        args.out,
        quick=args.quick,
        threads=args.threads,
        plot=not args.no_plot,
        progress=lambda message: print(message, file=sys.stderr, flush=True),
    )
    print(format_overhead(result))
    return 0


def _positive(kind: type) -> Callable[[str], Any]:
    """An argparse type: a number of ``kind`` above 0, or an error naming what was given."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
            ok = value > 0 and (value < 2**31 if kind is int else math.isfinite(value))
        except (ValueError, OverflowError):
            ok = False
        if not ok:
            bound = " and < 2**31" if kind is int else ""
            raise argparse.ArgumentTypeError(f"must be {kind.__name__} > 0{bound}, got {text!r}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hidlr", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="Figure 2: constant rate (grid-searched), Hi-ULR, Hi-DLR on 2-D functions"
    )
    demo.add_argument(
        "--out", default="runs/demo", help="folder for the figure (default: runs/demo)"
    )
    demo.add_argument(
        "--iterations", type=_positive(int), default=100, help="iterations per run (default: 100)"
    )
    demo.add_argument(
        "--no-plot", action="store_true", help="print the table only (no matplotlib needed)"
    )
    demo.set_defaults(func=_demo)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    rob = bench.add_parser(
        "robustness", help="Hi-DLR vs grid search and LR-free optimizers on small tasks"
    )
    rob.add_argument(
        "--out", default="runs/robustness", help="results folder (resumes what is there)"
    )
    rob.add_argument("--seeds", type=_positive(int), default=3, help="seeds per task (default: 3)")
    rob.add_argument(
        "--split",
        choices=("all", *SPLITS),
        default="all",
        help="which tasks (those on real data are left out where it is not installed)",
    )
    rob.add_argument("--tasks", nargs="*", help="task names (default: the split's)")
    rob.add_argument("--no-sweep", action="store_true", help="skip the initial-rate sweep")
    rob.add_argument(
        "--steps-scale",
        type=_positive(float),
        default=1.0,
        help="scale every task's steps (quick runs)",
    )
    rob.add_argument(
        "--probe-batch",
        choices=("next", "previous", "same", "both", "deferred", "heldout"),
        default="next",
        help="the batch Hi-DLR and GeN probe: the next training batch (default), the last "
        "step's, the gradient's own, the gradient's and the next together, the gradient's "
        "own with defer_probes (probed at the next step), or a random batch of a held-out "
        "tenth of the training set (not trained on)",
    )
    rob.add_argument(
        "--schedule",
        choices=("constant", "cosine", "linear"),
        default="constant",
        help="a decay multiplying Hi-DLR's and GeN's adapted rates over each run (default: none)",
    )
    rob.add_argument(
        "--policy",
        choices=("robust", "paper"),
        default="robust",
        help="Hi-DLR's and GeN's rate policy (default: robust; paper: Algorithm 1 as written)",
    )
    rob.add_argument("--workers", type=_positive(int), default=2, help="processes (default: 2)")
    rob.add_argument(
        "--reuse",
        metavar="FOLDER",
        help="copy the constant-rate grid and the Prodigy / D-Adaptation / DoG runs (which do "
        "not depend on Hi-DLR's settings) from another results folder with the same step "
        "scale, and run only the rest (for a study or a screen of a change to Hi-DLR)",
    )
    rob.set_defaults(func=_bench_robustness)
    greedy = bench.add_parser(
        "greedy",
        help="the one-step fit's rate multiple along a constant-rate run of a robustness task",
    )
    greedy.add_argument("task", help="a robustness task's name")
    greedy.add_argument(
        "--lr", type=_positive(float), required=True, help="the constant uniform rate"
    )
    greedy.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    greedy.add_argument(
        "--every", type=_positive(int), default=25, help="steps between fits (default: 25)"
    )
    greedy.set_defaults(func=_bench_greedy)
    ov = bench.add_parser("overhead", help="Hi-DLR's extra time and memory vs the base optimizer")
    ov.add_argument("--out", default="runs/overhead", help="results folder")
    ov.add_argument("--quick", action="store_true", help="MLP only, fewer K/Phi (about 1 minute)")
    ov.add_argument("--threads", type=_positive(int), default=1, help="torch threads (default: 1)")
    ov.add_argument("--no-plot", action="store_true", help="skip the PNG")
    ov.set_defaults(func=_bench_overhead)

    rep = sub.add_parser(
        "reproduce", help="the paper's experiments, one result file per run, and a report"
    )
    rep.add_argument(
        "--quick", action="store_true", help="small sizes, one seed: minutes on 2 cores"
    )
    rep.add_argument("--out", default="runs/paper", help="results folder (resumes what is there)")
    rep.add_argument(
        "--seeds",
        type=_positive(int),
        default=3,
        help="seeds where the paper reports a table (full mode)",
    )
    rep.add_argument("--only", nargs="*", help="experiment names (default: all)")
    rep.set_defaults(func=_reproduce)

    report = sub.add_parser("report", help="rebuild REPORT.md and figures from result files")
    report.add_argument("results", nargs="?", default="runs/paper", help="results folder")
    report.set_defaults(func=_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
