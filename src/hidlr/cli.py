"""The ``hidlr`` command: ``hidlr demo`` (Figure 2 of the paper)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


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
        "--iterations", type=int, default=100, help="iterations per run (default: 100)"
    )
    demo.add_argument(
        "--no-plot", action="store_true", help="print the table only (no matplotlib needed)"
    )
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
