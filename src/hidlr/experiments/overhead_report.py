"""The overhead benchmark's output: text tables and the figure, from its result dict only."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from hidlr.experiments.overhead_workloads import _MB, paper_bound

__all__ = ["format_overhead", "plot_overhead"]


def format_overhead(result: dict[str, Any]) -> str:
    """Plain-text tables: relative speed against the limit and the paper's bound per K and Phi,
    the memory comparison, Table 4 and the top of the probe-step profile."""
    cfg = result["config"]
    lines = [
        f"Hi-DLR overhead: torch {cfg['torch']}, {cfg['threads']} thread(s), "
        f"{cfg['repeats']} interleaved repeats (medians; the machine was shared, timings are noisy)",
    ]
    phis = cfg["phi"]
    if result["speed"]:
        lines.append("")
        lines.append("paper's lower bound 1/(1 + 4K/(3 Phi)):")
        lines.append(f"{'K':>4} | " + " ".join(f"{'Phi=' + str(p):>9}" for p in phis))
        for k in cfg["K"]:
            lines.append(f"{k:>4} | " + " ".join(f"{paper_bound(k, p):>9.3f}" for p in phis))
        lines.append("")
        lines.append(
            "relative speed base/HiDLR, measured / limit (limit = S / (S + n_fwd/Phi * F)); "
            "last column: bookkeeping per probe step"
        )
    blocks: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in result["speed"]:
        blocks.setdefault((r["model"], r["base"], r["policy"]), []).append(r)
    for (model, base, policy), rows in blocks.items():
        first = rows[0]
        plain = statistics.median(r["plain_step_s"] / r["base_step_s"] - 1 for r in rows)
        lines.append("")
        lines.append(
            f"{model} + {base}, policy={policy}: base step S={1e3 * first['base_step_s']:.1f} ms, "
            f"forward F={1e3 * first['forward_s']:.1f} ms (F/S={first['forward_s'] / first['base_step_s']:.2f}), "
            f"HiDLR plain step {plain:+.1%}"
        )
        lines.append(
            f"{'K':>4} | " + " ".join(f"{'Phi=' + str(p):>11}" for p in phis) + " | bookkeeping"
        )
        for k in cfg["K"]:
            by_phi = {r["phi"]: r for r in rows if r["K"] == k}
            if not by_phi:
                continue
            cells = [
                f"{by_phi[p]['speed']:.2f}/{by_phi[p]['limit']:.2f}".rjust(11)
                if p in by_phi
                else " " * 11
                for p in phis
            ]
            book = next(iter(by_phi.values()))
            lines.append(
                f"{k:>4} | "
                + " ".join(cells)
                + f" | {1e3 * book['bookkeeping_per_probe_step_s']:6.2f} ms"
            )
    if result.get("summary"):
        lines.append("")
        for policy, s in result["summary"].items():
            lines.append(
                f"[{policy}] measured/limit: median {s['median_speed_vs_limit']:.3f}, "
                f"worst {s['min_speed_vs_limit']:.3f}, within 3% in "
                f"{s['within_3pct_of_limit']}/{s['configs']}; at or above the paper's bound in "
                f"{s['above_paper_bound']}/{s['configs']}; from the bookkeeping timed inside probe "
                f"steps: median {s['median_expected_speed_vs_limit']:.3f}, within 3% in "
                f"{s['expected_within_3pct_of_limit']}/{s['configs']}"
            )
    if result["table4"]:
        lines.append("")
        lines.append("Table 4 (K=2): time per epoch, relative speed to the base optimizer")
        lines.append(
            f"{'model':<12} {'base':<6} {'policy':<7} {'Phi':>4} {'epoch s':>9} {'speed':>7} {'paper':>7}"
        )
        for r in result["table4"]:
            phi = "inf" if r["phi"] is None else str(r["phi"])
            lines.append(
                f"{r['model']:<12} {r['base']:<6} {r['policy']:<7} {phi:>4} {r['epoch_s']:>9.3f} "
                f"{r['relative_speed']:>7.3f} {r['paper_bound']:>7.3f}"
            )
    if result["memory"]:
        lines.append("")
        lines.append(
            "memory (MB above what was live at the step's start; K=2, Phi=2): "
            "peak of the whole training step and of optimizer.step alone"
        )
        lines.append(
            f"{'model':<12} {'base':<6} {'params':>7} {'snap':>7} | {'step:base':>9} "
            f"{'probe':>7} {'plain':>7} {'extra':>7} | {'opt.step extra probe':>20} "
            f"{'plain':>6} | {'retained':>8} | {'RSS base/probe':>15}"
        )
        for m in result["memory"]:
            rss = (
                f"{m['rss_growth_base'] / _MB:.1f}/{m['rss_growth_hidlr_probe'] / _MB:.1f}"
                if m["rss_growth_base"] is not None and m["rss_growth_hidlr_probe"] is not None
                else "n/a"
            )
            extra = m["opt_step_extra_probe"]
            lines.append(
                f"{m['model']:<12} {m['base']:<6} {m['param_bytes'] / _MB:>7.2f} "
                f"{m['snapshot_bytes'] / _MB:>7.2f} | {m['step_peak_base'] / _MB:>9.2f} "
                f"{m['step_peak_hidlr_probe'] / _MB:>7.2f} {m['step_peak_hidlr_plain'] / _MB:>7.2f} "
                f"{m['step_extra_probe'] / _MB:>7.2f} | "
                f"{extra / _MB:>9.2f} ({extra / max(m['param_bytes'], 1):5.3f}x) "
                f"{m['opt_step_extra_plain'] / _MB:>6.2f} | "
                f"{m['retained_extra_probe'] / _MB:>8.2f} | {rss:>15}"
            )
    if result["profile"]:
        profiles = result["profile"]
        lines.append("")
        lines.append(
            "probe step (optimizer.step with its closure) broken down, ms, median of "
            f"{len(profiles) and 3} probe steps; base {profiles[0]['base']}, policy "
            f"{profiles[0]['policy']}"
        )
        heads = [f"{p['model'][:5]} K={p['K']}" for p in profiles]
        lines.append(f"{'':<32}" + " ".join(f"{h:>13}" for h in heads))
        keys = list(dict.fromkeys(key for p in profiles for key in p["breakdown_ms"]))
        keys.sort(key=lambda key: (key == "total", key.startswith("other")))
        for key in keys:
            lines.append(
                f"{key:<32}"
                + " ".join(f"{p['breakdown_ms'].get(key, 0.0):>13.2f}" for p in profiles)
            )
        bookkeeping = [
            p["breakdown_ms"]["total"]
            - p["breakdown_ms"].get("forward passes (closure)", 0.0)
            - p["breakdown_ms"].get("base optimizer step", 0.0)
            for p in profiles
        ]
        lines.append(f"{'= bookkeeping':<32}" + " ".join(f"{b:>13.2f}" for b in bookkeeping))
        for p in profiles[-1:]:
            lines.append(f"top torch ops ({p['model']}, K={p['K']}), self CPU ms per probe step:")
            for row in p["ops"][:8]:
                lines.append(f"  {row['self_ms']:8.3f} ms {row['calls']:7.0f}x  {row['op']}")
    if result.get("probe_options"):
        from hidlr.experiments.probe_options import format_probe_options

        lines.append("")
        lines.append(format_probe_options(result["probe_options"]))
    return "\n".join(lines)


def plot_overhead(result: dict[str, Any], path: str | Path) -> Path:
    """Relative speed against Phi, one line per K (measured: solid, limit: dashed, the paper's
    bound: dotted), a panel per (model, base optimizer) and policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result["config"]
    combos = list(dict.fromkeys((r["model"], r["base"]) for r in result["speed"]))
    policies = list(dict.fromkeys(r["policy"] for r in result["speed"]))
    fig, axes = plt.subplots(
        len(combos),
        len(policies),
        figsize=(4.5 * len(policies), 3.2 * len(combos)),
        squeeze=False,
        sharey=True,
    )
    colors = plt.get_cmap("viridis")
    ks = cfg["K"]
    for i, (model, base) in enumerate(combos):
        for j, policy in enumerate(policies):
            ax = axes[i][j]
            for n, k in enumerate(ks):
                rows = sorted(
                    (
                        r
                        for r in result["speed"]
                        if (r["model"], r["base"], r["policy"], r["K"]) == (model, base, policy, k)
                    ),
                    key=lambda r: r["phi"],
                )
                if not rows:
                    continue
                c = colors(n / max(len(ks) - 1, 1))
                x = [r["phi"] for r in rows]
                ax.plot(x, [r["speed"] for r in rows], "o-", color=c, label=f"K={k}")
                ax.plot(x, [r["limit"] for r in rows], "--", color=c, alpha=0.8)
                ax.plot(x, [r["paper_bound"] for r in rows], ":", color=c, alpha=0.6)
            ax.set_xscale("log", base=2)
            ax.set_xticks(cfg["phi"], [str(p) for p in cfg["phi"]])
            ax.minorticks_off()
            ax.set_title(f"{model} + {base}, {policy}", fontsize=9)
            ax.set_xlabel("Phi (update_every)")
            ax.set_ylim(0, 1.05)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel("speed vs base")
    axes[0][0].legend(fontsize=7, title="solid: measured\n--: limit, ..: paper", title_fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
