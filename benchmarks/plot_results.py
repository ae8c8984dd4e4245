#!/usr/bin/env python3
"""PNG chart of a bench_decode.py results JSON.

    python benchmarks/plot_results.py benchmarks/results/decode_<gpu>_<time>.json [--out chart.png]

Top panel: time per decode step of every implementation, per shape (log scale, lower is better).
Bottom panel: speedup of ours over the best peer per shape (best peer us / ours us, > 1 means ours is
faster), with the geomean. Shapes whose row is missing or failed leave a gap.
"""

from __future__ import annotations

import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")  # file output only; works without a display
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_table  # noqa: E402

COLORS = {"ours": "#d62728", "flashmla": "#1f77b4", "fa3mla": "#2ca02c"}


def tick_label(shape: dict) -> str:
    s_k = shape["s_k"]
    s_k_text = f"{s_k // 1024}k" if s_k % 1024 == 0 else str(s_k)
    dist = " var" if shape["varlen"] else ""
    return f"b{shape['b']} {s_k_text} h{shape['h_q']} q{shape['s_q']}{dist}"


def plot(doc: dict, out_path: str, title: str | None) -> None:
    rows = doc["rows"]
    shapes = make_table.per_shape(rows)
    impls = make_table.impls_in(rows)
    n = len(shapes)
    x = list(range(n))
    width = 0.8 / max(1, len(impls))

    fig, (ax_us, ax_ratio) = plt.subplots(
        2, 1, figsize=(max(10.0, 0.32 * n + 2.5), 9.0), sharex=True, gridspec_kw={"height_ratios": [3, 2]}
    )
    for j, impl in enumerate(impls):
        xs, ys = [], []
        for i, s in enumerate(shapes):
            row = s["rows"].get(impl)
            if make_table.timed(row):
                xs.append(i + (j - (len(impls) - 1) / 2) * width)
                ys.append(row["us"])
        ax_us.bar(xs, ys, width=width, label=impl, color=COLORS.get(impl))
    ax_us.set_yscale("log")
    ax_us.set_ylabel("µs per decode step (log)")
    ax_us.legend(loc="upper left")
    ax_us.grid(axis="y", which="both", alpha=0.3)

    speedups = [s["speedup"] for s in shapes]
    xs = [i for i, v in enumerate(speedups) if v is not None]
    ys = [v for v in speedups if v is not None]
    ax_ratio.bar(xs, ys, width=0.7, color=["#2ca02c" if v >= 1 else "#d62728" for v in ys])
    ax_ratio.axhline(1.0, color="black", linewidth=0.8)
    geo = make_table.geomean(ys)
    if geo is not None:
        ax_ratio.axhline(geo, color="#555555", linestyle="--", linewidth=1, label=f"geomean {geo:.3f}×")
        ax_ratio.legend(loc="upper left")
    ax_ratio.set_ylabel("ours speedup vs best peer")
    ax_ratio.grid(axis="y", alpha=0.3)
    ax_ratio.set_xticks(x)
    ax_ratio.set_xticklabels([tick_label(s["shape"]) for s in shapes], rotation=90, fontsize=7)
    ax_ratio.set_xlim(-0.6, n - 0.4)

    fig.suptitle(title or make_table.caption(doc), fontsize=9)
    fig.tight_layout()
    fig.savefig(out_path, dpi=130)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", help="results JSON written by bench_decode.py")
    p.add_argument("--out", help="PNG path (default: the results path with .png)")
    p.add_argument("--title", help="figure title (default: GPU, versions, commit, date)")
    args = p.parse_args(argv)
    doc = make_table.load(args.results)
    out_path = args.out or os.path.splitext(args.results)[0] + ".png"
    plot(doc, out_path, args.title)
    print(out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
