#!/usr/bin/env python3
"""Scheduler cost: GPU time of one get_mla_metadata call, as vLLM's metadata builder makes it once per
decode step, for batches of 1 to 4096 requests.

For each case one CUDA graph holds `--calls` back-to-back scheduler launches on the same seqlens; CUDA
events around a replay give the time per call, and the median of `--reps` replays is reported. A graph
of as many one-element `add_` kernels gives the floor: what any kernel costs as a node of a graph. Only
this project's scheduler is timed: FlashMLA and FA3-MLA's schedulers are measured in context by
bench_decode.py (`meta_us`). Needs the built extension and a Hopper GPU, not vLLM.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shlex
import sys

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)
sys.path.append(os.path.dirname(BENCH_DIR))

from results_io import default_results_path, git_state, write_json  # noqa: E402

BATCHES = (1, 4, 16, 32, 64, 128, 256, 512, 1024, 4096)
CONTEXTS = (4096, 32768)  # mean keys per request
QUERY_ROWS = (16, 128)  # s_q * h_q: one tile (132 parts on an H100) or two (66)


def seqlens(torch, b: int, s_k: int, varlen: bool, gen):
    """Uniform s_k, or bench_decode.py's varlen rule: round(Normal(s_k, s_k / 2)) clipped to [1, 2 s_k]."""
    if not varlen:
        return torch.full((b,), s_k, dtype=torch.int32)
    x = torch.randn(b, generator=gen) * (s_k / 2) + s_k
    return x.round().clamp(1, 2 * s_k).to(torch.int32)


def graph_us(torch, fn, calls: int, reps: int) -> float:
    """Median GPU time of one fn() inside a CUDA graph of `calls` of them."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fn()  # warm-up outside the graph (first-launch costs, shared-memory attribute)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / calls)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="results JSON (default: benchmarks/results/sched_<gpu>_<utc time>.json)")
    p.add_argument("--calls", type=int, default=200, help="scheduler launches per graph")
    p.add_argument("--reps", type=int, default=9, help="timed replays per case; the median is reported")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch

    from vllm_flashmla import get_mla_metadata

    if not torch.cuda.is_available():
        print("bench_scheduler.py needs a CUDA GPU", file=sys.stderr)
        return 2
    commit, dirty = git_state()
    gpu = torch.cuda.get_device_name()
    doc = {
        "gpu": gpu,
        "git_commit": commit,
        "git_dirty": dirty,
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "method": {"calls_per_graph": args.calls, "reps": args.reps, "seed": args.seed,
                   "us": "median over reps of graph replay time / calls",
                   "varlen": "round(Normal(s_k, s_k/2)) clipped to [1, 2*s_k]"},
        "rows": [],
    }
    out = args.out or default_results_path("sched", gpu)
    one = torch.zeros(1, device="cuda")
    doc["floor_us"] = graph_us(torch, lambda: one.add_(1), args.calls, args.reps)
    print(f"floor (one add_ kernel per graph node): {doc['floor_us']:.2f} us")
    gen = torch.Generator().manual_seed(args.seed)
    for b, s_k, rows, varlen in itertools.product(BATCHES, CONTEXTS, QUERY_ROWS, (False, True)):
        lens = seqlens(torch, b, s_k, varlen, gen).cuda()
        us = graph_us(torch, lambda: get_mla_metadata(lens, rows, 1), args.calls, args.reps)
        doc["rows"].append({"b": b, "s_k": s_k, "num_q_rows": rows, "varlen": varlen, "us": round(us, 3)})
        print(f"b={b:5d} s_k={s_k:6d} rows={rows:4d} {'varlen ' if varlen else 'uniform'} {us:8.2f} us", flush=True)
    write_json(out, doc)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
