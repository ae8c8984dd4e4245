#!/usr/bin/env python3
"""Scheduler cost: GPU time of one get_mla_metadata call, as vLLM's metadata builder makes it once per
decode step, for batches of 1 to 4096 requests.

Each case is a CUDA graph of `MIN_CALLS_PER_GRAPH` back-to-back scheduler launches on the seqlens that
bench_decode.py draws for the same shape (its make_seqlens and seed), timed as bench_decode.py times
its steps (its capture and time_graphs), in alternation with a graph of as many one-element `add_`
kernels: the floor of any kernel as a node of a graph. Only this project's scheduler is timed;
FlashMLA's and FA3-MLA's are measured in context by bench_decode.py (`meta_us`). Needs the built
extension and a Hopper GPU, not vLLM.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shlex
import sys

import numpy as np

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)

import bench_decode  # noqa: E402  (its shapes, seqlens, graph capture and timing)
from results_io import default_results_path, git_state, write_json  # noqa: E402

BATCHES = (1, 4, 16, 32, 64, 128, 256, 512, 1024, 4096)
CONTEXTS = (4096, 32768)  # mean keys per request
QUERY_ROWS = (16, 128)  # s_q * h_q: one tile (132 parts on an H100) or two (66)


def case_seqlens(shape: bench_decode.Shape, seed: int) -> np.ndarray:
    """The seqlens bench_decode.py uses for this shape and seed (h_q does not enter its seed)."""
    return bench_decode.make_seqlens(shape, np.random.default_rng(bench_decode.shape_seed(seed, shape)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="results JSON (default: benchmarks/results/sched_<gpu>_<utc time>.json)")
    p.add_argument("--reps", type=int, default=7, help="timed repetitions per graph; the median is reported")
    p.add_argument("--target-ms", type=float, default=25.0, help="GPU time per repetition (sets the replay count)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch

    from vllm_flashmla import get_mla_metadata

    if not torch.cuda.is_available():
        print("bench_scheduler.py needs a CUDA GPU", file=sys.stderr)
        return 2
    commit, dirty = git_state()
    gpu = torch.cuda.get_device_name()
    calls = bench_decode.MIN_CALLS_PER_GRAPH
    doc = {
        "gpu": gpu,
        "git_commit": commit,
        "git_dirty": dirty,
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "method": {"calls_per_graph": calls, "reps": args.reps, "target_ms_per_rep": args.target_ms,
                   "seed": args.seed, "us": "per call, median of reps (bench_decode.time_graphs)",
                   "floor_us": "the same for a one-element add_, timed in alternation with each case",
                   "seqlens": "bench_decode.make_seqlens of Shape(b, s_k, num_q_rows, 1, varlen)"},
        "rows": [],
    }
    out = args.out or default_results_path("sched", gpu)
    one = torch.zeros(1, device="cuda")
    floor, _ = bench_decode.capture(lambda i: one.add_(1), calls)
    for b, s_k, rows, varlen in itertools.product(BATCHES, CONTEXTS, QUERY_ROWS, (False, True)):
        shape = bench_decode.Shape(b, s_k, rows, 1, varlen)
        lens = torch.from_numpy(case_seqlens(shape, args.seed)).to(device="cuda", dtype=torch.int32)
        graph, _ = bench_decode.capture(lambda i: get_mla_metadata(lens, rows, 1), calls)
        us, floor_us = bench_decode.time_graphs([graph, floor], calls, args.reps, args.target_ms)
        doc["rows"].append({**shape.as_dict(), "num_q_rows": rows, "us": round(us, 3), "floor_us": round(floor_us, 3)})
        print(f"{shape.label():28s} {us:8.2f} us (floor {floor_us:.2f})", flush=True)
    write_json(out, doc)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
