#!/usr/bin/env python3
"""Calibration sweep of the scheduler's cost model: our decode kernel timed under the plans the
scheduler would make with other values of FIXED_OVERHEAD_PAGES (csrc/sched_meta.h).

The plans come from the Python model (vllm_flashmla.scheduler.plan_splits with an overhead, which
then both chooses the plan and cuts it: the kernel cuts tiles of few rows with FEW_ROWS_OVERHEAD_PAGES),
so no rebuild is needed; each plan's output is checked against the reference, then all plans of a shape
are timed in alternation (bench_decode.time_graphs, --target-ms of replays per repetition, median of
--reps) on bench_decode.py's inputs and KV rotation (copies >= 4x L2). Alternating plans is noisier
than bench_decode.py's timing of one implementation at a time (docs/perf-notes.md, round 7): trust
only differences well above a few percent. Needs an sm90 GPU and the built extension (not vLLM):

    python benchmarks/sweep_sched_overhead.py --overheads 1,2,3,5,8 --out /tmp/sched_overhead.json
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_decode as bd  # noqa: E402
from results_io import git_state, write_json  # noqa: E402

from vllm_flashmla import flash_mla_with_kvcache  # noqa: E402
from vllm_flashmla._layout import D_V  # noqa: E402
from vllm_flashmla.scheduler import num_sm_parts_for, plan_splits  # noqa: E402

# Varlen b = 128 (where tail balance matters), uniform controls, and small batches (few requests,
# many parts per request).
SHAPES = (
    [bd.Shape(128, s_k, h_q, 1, True) for s_k in (4096, 8192, 16384) for h_q in (16, 64, 128)]
    + [bd.Shape(128, 8192, 16, 2, True), bd.Shape(128, 8192, 64, 2, True), bd.Shape(128, 4096, 16, 1, False)]
    + [bd.Shape(32, 1024, 128, 1, False), bd.Shape(4, 1024, 128, 1, False), bd.Shape(16, 32768, 128, 1, False)]
    + [bd.Shape(1, 8192, 16, 1, False), bd.Shape(1, 1024, 128, 1, False)]
)


def plan_tensors(
    seqlens: list[int], num_sm_parts: int, num_q_rows: int, overhead: int
) -> tuple[torch.Tensor, torch.Tensor]:
    plan = plan_splits(seqlens, num_sm_parts, num_q_rows, overhead)
    records = torch.tensor([r.to_ints() for r in plan.records], dtype=torch.int32, device="cuda")
    return records, torch.tensor(plan.num_splits, dtype=torch.int32, device="cuda")


def sweep_shape(
    shape: bd.Shape, overheads: list[int], reps: int, target_ms: float, l2_bytes: int, num_sms: int
) -> dict:
    inp = bd.make_inputs(shape, 0, "cuda")
    kv, calls = bd.kv_rotation(inp, l2_bytes)
    n = len(kv)
    out = torch.empty(shape.b, shape.s_q, shape.h_q, D_V, dtype=torch.bfloat16, device="cuda")
    base = bd.reference_baseline(inp)
    rows = shape.s_q * shape.h_q
    parts = num_sm_parts_for(num_sms, rows)
    plans = [plan_tensors(inp.seqlens_cpu.tolist(), parts, rows, o) for o in overheads]  # alive while graphs replay
    graphs = []
    for o, (records, splits) in zip(overheads, plans, strict=True):
        graph, (o_out, o_lse) = bd.capture(
            lambda i, records=records, splits=splits: flash_mla_with_kvcache(
                inp.q, kv[i % n], inp.block_table, inp.seqlens, D_V, records, splits,
                softmax_scale=inp.scale, causal=inp.causal, out=out, check_seqlens=False,
            ),
            calls,
        )  # fmt: skip
        graph.replay()
        torch.cuda.synchronize()
        fields = bd.compare(o_out, o_lse, base)
        if "error" in fields:
            raise RuntimeError(f"{shape} with overhead {o}: {fields['error']}")
        graphs.append(graph)
    times = bd.time_graphs(graphs, calls, reps, target_ms)
    return {**shape.as_dict(), "us": {str(o): round(t, 3) for o, t in zip(overheads, times, strict=True)}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--overheads", default="1,2,3,5,8", help="comma-separated FIXED_OVERHEAD_PAGES values")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--target-ms", type=float, default=20.0, help="GPU time per repetition of each plan")
    p.add_argument("--out", required=True, help="results JSON")
    args = p.parse_args()
    overheads = [int(x) for x in args.overheads.split(",")]
    props = torch.cuda.get_device_properties(0)
    commit, dirty = git_state()
    doc = {"gpu": props.name, "git_commit": commit, "git_dirty": dirty, "command": " ".join(sys.argv),
           "overheads": overheads, "rows": []}  # fmt: skip
    print(f"{'b/s_k/h_q/s_q':<24}" + "".join(f"{'ovh=' + str(o):>10}" for o in overheads))
    for shape in SHAPES:
        row = sweep_shape(shape, overheads, args.reps, args.target_ms, props.L2_cache_size, props.multi_processor_count)
        doc["rows"].append(row)
        write_json(args.out, doc)
        name = f"{shape.b}/{shape.s_k}/{shape.h_q}/{shape.s_q}{'v' if shape.varlen else 'u'}"
        print(f"{name:<24}" + "".join(f"{t:10.1f}" for t in row["us"].values()))
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
