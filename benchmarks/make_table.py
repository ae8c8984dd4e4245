#!/usr/bin/env python3
"""Markdown table of a bench_decode.py results JSON, for the README.

    python benchmarks/make_table.py benchmarks/results/decode_<gpu>_<time>.json

One line per shape: time of every implementation, GB/s and TFLOPS of ours, and the speedup of ours
over the best peer (best peer us / ours us; > 1 means ours is faster), then the geomean and a summary
per regime (GROUPS). Pure Python,
no torch: bench_decode.py and plot_results.py import the summary helpers from here.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

IMPL_ORDER = ("ours", "flashmla", "fa3mla")
SPEEDUP_DEFINITION = "best peer us / ours us (> 1: ours faster)"


def load(path: str) -> dict:
    with open(path) as f:
        doc = json.load(f)
    if not isinstance(doc.get("rows"), list):
        raise ValueError(f"{path}: no top-level 'rows' list; not a bench_decode.py results file")
    return doc


def shape_key(row: dict) -> tuple:
    return (row["b"], row["s_k"], row["h_q"], row["s_q"], bool(row["varlen"]))


def shape_label(shape: dict) -> str:
    dist = "varlen" if shape["varlen"] else "uniform"
    return f"b={shape['b']} s_k={shape['s_k']} h_q={shape['h_q']} s_q={shape['s_q']} {dist}"


def impls_in(rows: list[dict]) -> list[str]:
    names = {r["impl"] for r in rows}
    return [n for n in IMPL_ORDER if n in names] + sorted(names - set(IMPL_ORDER))


def timed(row: dict | None) -> bool:
    if row is None or row.get("error"):
        return False
    us = row.get("us")
    return isinstance(us, (int, float)) and math.isfinite(us) and us > 0


def geomean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def per_shape(rows: list[dict]) -> list[dict]:
    """Shapes in first-appearance order: {'shape', 'rows' {impl: row}, 'best_peer', 'best_peer_us',
    'speedup' (vs best peer), 'speedup_vs' {peer: peer us / ours us}}."""
    grouped: dict[tuple, dict] = {}
    for row in rows:
        grouped.setdefault(shape_key(row), {})[row["impl"]] = row
    result = []
    for key, by_impl in grouped.items():
        ours = by_impl.get("ours")
        peers = {n: r["us"] for n, r in by_impl.items() if n != "ours" and timed(r)}
        best = min(peers, key=peers.get) if peers else None
        entry = {
            "shape": dict(zip(("b", "s_k", "h_q", "s_q", "varlen"), key, strict=True)),
            "rows": by_impl,
            "best_peer": best,
            "best_peer_us": peers.get(best),
            "speedup": None,
            "speedup_vs": {},
        }
        if timed(ours):
            entry["speedup_vs"] = {n: us / ours["us"] for n, us in peers.items()}
            entry["speedup"] = entry["speedup_vs"].get(best)
        result.append(entry)
    return result


def _ours_us(entry: dict) -> float | None:
    ours = entry["rows"].get("ours")
    return ours["us"] if timed(ours) else None


def summary_dict(rows: list[dict]) -> dict:
    """Derived numbers stored next to the rows in the results JSON (the rows stay the source of truth)."""
    shapes = per_shape(rows)
    peers = [n for n in impls_in(rows) if n != "ours"]
    return {
        "speedup_definition": SPEEDUP_DEFINITION,
        "per_shape": [
            {
                **s["shape"],
                "ours_us": _ours_us(s),
                "best_peer": s["best_peer"],
                "best_peer_us": s["best_peer_us"],
                "speedup": s["speedup"],
            }
            for s in shapes
        ],
        "shapes_compared": sum(s["speedup"] is not None for s in shapes),
        "shapes_below_parity": sum(s["speedup"] is not None and s["speedup"] < 1.0 for s in shapes),
        "geomean_speedup": geomean([s["speedup"] for s in shapes]),
        "geomean_speedup_vs": {p: geomean([s["speedup_vs"].get(p) for s in shapes]) for p in peers},
    }


# Regimes the README describes, by FlashMLA's measure of work per KV byte (query rows h_q * s_q per
# request): memory-bound up to 64 rows, compute-bound from 128, for large batches; and small batches.
def _large_batch(memory_bound: bool, varlen: bool):
    def member(s: dict) -> bool:
        rows = s["h_q"] * s["s_q"]
        return s["b"] >= 64 and (rows <= 64 if memory_bound else rows >= 128) and s["varlen"] == varlen

    return member


GROUPS = (
    ("b >= 64, h_q * s_q <= 64, uniform", _large_batch(memory_bound=True, varlen=False)),
    ("b >= 64, h_q * s_q <= 64, varlen", _large_batch(memory_bound=True, varlen=True)),
    ("b >= 64, h_q * s_q >= 128, uniform", _large_batch(memory_bound=False, varlen=False)),
    ("b >= 64, h_q * s_q >= 128, varlen", _large_batch(memory_bound=False, varlen=True)),
    ("b <= 32, h_q = 16", lambda s: s["b"] <= 32 and s["h_q"] == 16),
    ("b <= 32, h_q = 128", lambda s: s["b"] <= 32 and s["h_q"] == 128),
)


def groups(rows: list[dict]) -> list[dict]:
    """Per GROUPS entry with at least one compared shape: its label, shape count, geomean and range of
    ours' speedup over the best peer, shapes below 1.000x, and the range of ours' GB/s and TFLOPS."""
    compared = [s for s in per_shape(rows) if s["speedup"] is not None]
    result = []
    for label, member in GROUPS:
        shapes = [s for s in compared if member(s["shape"])]
        if not shapes:
            continue
        speedups = [s["speedup"] for s in shapes]
        ours = [s["rows"]["ours"] for s in shapes]
        gbps = [r["gbps"] for r in ours if r.get("gbps") is not None]
        tflops = [r["tflops"] for r in ours if r.get("tflops") is not None]
        result.append(
            {
                "group": label,
                "shapes": len(shapes),
                "geomean_speedup": geomean(speedups),
                "speedup_range": (min(speedups), max(speedups)),
                "below_parity": sum(v < 1.0 for v in speedups),
                "gbps_range": (min(gbps), max(gbps)) if gbps else None,
                "tflops_range": (min(tflops), max(tflops)) if tflops else None,
            }
        )
    return result


def _range(pair: tuple | None, digits: int, unit: str = "") -> str:
    return "—" if pair is None else f"{pair[0]:.{digits}f}{unit}-{pair[1]:.{digits}f}{unit}"


def groups_markdown(summary: list[dict]) -> str:
    """The table of groups(rows): what the README's prose about each regime quotes."""
    lines = [
        "| shapes | n | geomean | speedup range | below 1.000× | ours GB/s | ours TFLOPS |",
        "|---|---:|---:|---|---:|---|---|",
    ]
    for g in summary:
        lines.append(
            f"| {g['group']} | {g['shapes']} | {g['geomean_speedup']:.3f}× | {_range(g['speedup_range'], 3, '×')} | "
            f"{g['below_parity']} | {_range(g['gbps_range'], 0)} | {_range(g['tflops_range'], 0)} |"
        )
    return "\n".join(lines)


def _fmt(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _us_cell(row: dict | None) -> str:
    if row is None:
        return "—"
    if row.get("error"):
        return "n/a" if row["error"].startswith("unavailable") else "ERR"
    return _fmt(row.get("us"), 1)


def caption(doc: dict) -> str:
    versions = doc.get("versions") or {}
    clocks = doc.get("clocks") or {}
    parts = [f"GPU: {doc.get('gpu', '?')}"]
    if clocks.get("clocks.max.sm"):
        parts.append(f"max SM clock {clocks['clocks.max.sm']}")
    parts.append(
        f"vLLM {versions.get('vllm', '?')}, torch {versions.get('torch', '?')}, CUDA {versions.get('cuda', '?')}"
    )
    if (doc.get("method") or {}).get("both_orders"):
        parts.append("each shape timed in both implementation orders (mean)")
    commit = doc.get("git_commit") or "unknown"
    parts.append(f"commit {commit[:12]}{' (dirty)' if doc.get('git_dirty') else ''}")
    parts.append(doc.get("timestamp", ""))
    return " | ".join(p for p in parts if p)


def markdown(rows: list[dict], header: dict | None = None) -> str:
    """Markdown table; `header` (the results JSON without its rows) adds a caption line."""
    impls = impls_in(rows)
    shapes = per_shape(rows)
    lines = []
    if header:
        lines += [caption(header), ""]
    cols = ["b", "s_k", "h_q", "s_q", "seqlens"] + [f"{n} µs" for n in impls]
    cols += ["ours GB/s", "ours TFLOPS", "best peer", "speedup"]
    lines.append("| " + " | ".join(cols) + " |")
    aligns = ["---:"] * 4 + ["---"] + ["---:"] * len(impls) + ["---:", "---:", "---", "---:"]
    lines.append("|" + "|".join(aligns) + "|")
    for s in shapes:
        sh, by_impl = s["shape"], s["rows"]
        ours = by_impl.get("ours") if timed(by_impl.get("ours")) else None
        cells = [str(sh["b"]), str(sh["s_k"]), str(sh["h_q"]), str(sh["s_q"]), "varlen" if sh["varlen"] else "uniform"]
        cells += [_us_cell(by_impl.get(n)) for n in impls]
        cells += [_fmt(ours and ours.get("gbps"), 0), _fmt(ours and ours.get("tflops"), 1)]
        cells += [s["best_peer"] or "—", "—" if s["speedup"] is None else f"{s['speedup']:.3f}×"]
        lines.append("| " + " | ".join(cells) + " |")

    summary = summary_dict(rows)
    g = summary["geomean_speedup"]
    blank = [""] * (len(cols) - 2)
    lines.append("| " + " | ".join(["**geomean**", *blank, "**—**" if g is None else f"**{g:.3f}×**"]) + " |")
    lines.append("")
    vs = ", ".join(f"vs {p} {v:.3f}×" for p, v in summary["geomean_speedup_vs"].items() if v is not None)
    speedups = [s["speedup"] for s in shapes if s["speedup"] is not None]
    below = f"; {summary['shapes_below_parity']} below 1.000×" + (f" (lowest {min(speedups):.3f}×)" if speedups else "")
    lines.append(
        f"Speedup = {SPEEDUP_DEFINITION}, three decimals so that a shape just below parity shows as one. "
        f"Geomean over {summary['shapes_compared']} shapes" + (f" ({vs})" if vs else "") + below + "."
    )
    regimes = groups(rows)
    if regimes:
        lines += ["", "By regime (speedup over the best peer per shape):", "", groups_markdown(regimes)]
    problems = [r for r in rows if r.get("error") and not r["error"].startswith("unavailable")]
    unavailable = {r["impl"]: r["error"] for r in rows if r.get("error", "") and r["error"].startswith("unavailable")}
    for r in problems:
        lines.append(f"- ERR {r['impl']} {shape_label(r)}: {r['error'][:200]}")
    for impl, error in unavailable.items():
        lines.append(f"- n/a {impl}: {error[:200]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", help="results JSON written by bench_decode.py")
    p.add_argument("--no-caption", action="store_true", help="omit the GPU/versions line above the table")
    args = p.parse_args(argv)
    doc = load(args.results)
    print(markdown(doc["rows"], header=None if args.no_caption else doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
