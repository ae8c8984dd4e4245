#!/usr/bin/env python3
"""Our decode kernel timed under split plans that visit the requests in another order than the batch's.

The device scheduler's budget plan (csrc/sched_plan.h) walks the requests in batch order, so in a
varlen batch almost every part boundary cuts a request, and every cut piece writes an fp32 partial
that the combine reads back (docs/perf-notes.md, round 25). Plans that pack whole requests into parts
cut fewer of them, but need the kernel to visit requests in the plan's order. That order is emulated
here without a kernel change: the batch itself is permuted (q, block_table and cache_seqlens in the
plan's order), the plan is a plain one over the permuted batch, and the outputs of every request are
permuted back and checked against the reference before anything is timed. What this leaves out: the
kernel would look each request up in the plan's order (order[pos]), and the scheduler would sort the
batch and pack it.

Plans (each with the budget and cut overhead of the budget plan, sched_meta.h):

* main: what the device scheduler does today (vllm_flashmla.scheduler.plan_splits), batch order.
* chain-short-S / chain-best-S: the requests sorted by length; part by part, the rest of the request
  cut at the end of the previous part comes first, then whole requests while they fit (shortest first,
  or best fit: the longest that fits), then, unless at most S pages of budget are left, the longest
  unplaced request is cut to fill the part. The last part takes what is left.

These are round 25's sketches (ties by request index, no guard on the slack), not the scheduler's own
chained plan of branch chain-plan. Each plan's graph is timed on its own, in rounds that rotate the
plans, and each plan's fastest round counts. Needs an sm90 GPU and the built extension (not vLLM):

    python benchmarks/sweep_plans.py --out /tmp/sweep_plans.json
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import os
import sys
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_decode as bd  # noqa: E402
from results_io import git_state, write_json  # noqa: E402

from vllm_flashmla._layout import SchedRecord  # noqa: E402
from vllm_flashmla.scheduler import (  # noqa: E402
    SchedulePlan,
    budget_of,
    cut_overhead_pages,
    idle_record,
    num_pages_of,
    num_sm_parts_for,
    plan_splits,
)

# Varlen b = 128, where the budget plan cuts at nearly every part boundary: the memory-bound shapes of
# the grid (16-64 rows, one tile), and the compute-bound ones of two and four tiles, whose partials are
# two and four times as large and whose parts hold two and four requests.
SHAPES = [bd.Shape(128, s_k, h_q, s_q, True) for s_k in (4096, 8192, 16384)
          for h_q, s_q in ((16, 1), (16, 2), (32, 1), (32, 2), (64, 1))] + [
          bd.Shape(128, s_k, 128, s_q, True) for s_k in (8192, 16384) for s_q in (1, 2)]  # fmt: skip

Piece = tuple[int, int, int]  # (request, first page, end page)


@dataclass(frozen=True)
class OrderedPlan:
    order: list[int]  # order[pos]: the request the plan visits at position pos
    plan: SchedulePlan  # over the batch permuted by order


def chained_parts(
    pages: list[int], num_sm_parts: int, budget: int, overhead: int, fill: str, slack: int
) -> list[list[Piece]]:
    """The pieces of each part of a chained plan (module docstring); fill is "short" or "best"."""
    assert fill in ("short", "best") and budget > overhead
    unplaced = sorted(range(len(pages)), key=lambda r: (pages[r], r))  # ascending; the longest last
    keys = [pages[r] for r in unplaced]
    parts: list[list[Piece]] = []
    carry: tuple[int, int] | None = None  # (request, first page not yet placed)
    for p in range(num_sm_parts):
        last = p + 1 == num_sm_parts
        room = None if last else budget  # None: no limit
        part: list[Piece] = []
        if carry is not None:
            req, first = carry
            left = pages[req] - first
            if room is None or left + overhead <= room:
                part.append((req, first, pages[req]))
                carry = None
                if room is not None:
                    room -= left + overhead
            else:  # the rest does not fit either: this part is all of it that fits
                take = room - overhead
                part.append((req, first, first + take))
                carry = (req, first + take)
                parts.append(part)
                continue
        while unplaced:
            if room is None:
                i = 0
            elif fill == "short":
                i = 0 if keys[0] + overhead <= room else -1
            else:
                i = bisect.bisect_right(keys, room - overhead) - 1
            if i < 0:
                break
            req = unplaced.pop(i)
            keys.pop(i)
            part.append((req, 0, pages[req]))
            if room is not None:
                room -= pages[req] + overhead
        if unplaced and room is not None and room - overhead > slack:
            req = unplaced.pop()
            keys.pop()
            take = room - overhead
            part.append((req, 0, take))
            carry = (req, take)
        parts.append(part)
    assert carry is None and not unplaced
    return parts


def plan_from_parts(parts: list[list[Piece]], pages: list[int], num_sm_parts: int) -> OrderedPlan:
    """Records over the batch permuted into the order in which the parts meet the requests. Each part's
    pieces must be: the rest of a request cut before (if any), whole requests, and the head of a request
    cut here (if any), so that each part is one contiguous run of positions."""
    order: list[int] = []
    pos_of: dict[int, int] = {}
    for part in parts:
        for req, _, _ in part:
            if req not in pos_of:
                pos_of[req] = len(order)
                order.append(req)
    assert sorted(order) == list(range(len(pages))), "every request in exactly one run of pieces"
    pieces_of = [0] * len(order)
    for part in parts:
        for req, _, _ in part:
            pieces_of[pos_of[req]] += 1
    num_splits = [0, *itertools.accumulate(pieces_of)]
    seen = [0] * len(order)  # pieces of each position placed so far
    records: list[SchedRecord] = []
    for part in parts:
        if not part:
            records.append(idle_record(len(order)))
            continue
        (req0, first0, _), (req1, _, end1) = part[0], part[-1]
        slot = num_splits[pos_of[req0]] + seen[pos_of[req0]]
        records.append(SchedRecord(pos_of[req0], first0, pos_of[req1], end1, slot))
        for req, _, _ in part:
            seen[pos_of[req]] += 1
    records += [idle_record(len(order))] * (num_sm_parts - len(records))
    return OrderedPlan(order, SchedulePlan(records, num_splits))


def check_plan(plan: SchedulePlan, pages: list[int]) -> None:
    """Raise unless the plan covers every page of every position exactly once, and no other (no piece
    out of its request's pages, no position out of the batch), each request by as many pieces as
    num_splits says, a split one's pieces writing the slots num_splits[pos] .. [pos + 1] - 1 once each
    in page order."""
    covered = [[] for _ in pages]
    for rec in plan.records:
        if rec.begin_req <= rec.end_req and not 0 <= rec.begin_req <= rec.end_req < len(pages):
            raise AssertionError(f"record {rec} is out of the batch's {len(pages)} positions")
    for _, pos, first, end, slot in plan.walk(pages):
        if not 0 <= first <= end <= pages[pos]:
            raise AssertionError(f"position {pos} of {pages[pos]} pages has a piece [{first}, {end})")
        covered[pos].append((first, end, slot))
    for pos, pieces in enumerate(covered):
        pieces.sort()
        n = plan.num_splits[pos + 1] - plan.num_splits[pos]
        if len(pieces) != n:
            raise AssertionError(f"position {pos}: {len(pieces)} pieces, num_splits says {n}")
        bounds = [0] + [e for _, e, _ in pieces]
        if [f for f, _, _ in pieces] != bounds[:-1] or bounds[-1] != pages[pos]:
            raise AssertionError(f"position {pos} of {pages[pos]} pages covered as {pieces}")
        if n > 1 and [s for _, _, s in pieces] != list(range(plan.num_splits[pos], plan.num_splits[pos + 1])):
            raise AssertionError(f"position {pos}: slots {[s for _, _, s in pieces]}")


def plans_for(
    seqlens: list[int], num_sm_parts: int, num_q_rows: int, slacks: tuple[int, ...]
) -> dict[str, OrderedPlan]:
    pages = [num_pages_of(s) for s in seqlens]
    overhead = cut_overhead_pages(num_q_rows)
    budget = budget_of(pages, num_sm_parts, overhead)
    plans = {"main": OrderedPlan(list(range(len(pages))), plan_splits(seqlens, num_sm_parts, num_q_rows))}
    for fill in ("short", "best"):
        for slack in slacks:
            parts = chained_parts(pages, num_sm_parts, budget, overhead, fill, slack)
            plans[f"chain-{fill}-{slack}"] = plan_from_parts(parts, pages, num_sm_parts)
    for plan in plans.values():
        check_plan(plan.plan, [pages[r] for r in plan.order])
    return plans


def split_pieces(plan: SchedulePlan) -> int:
    return sum(b - a for a, b in zip(plan.num_splits, plan.num_splits[1:]) if b - a > 1)


def sweep_shape(shape: bd.Shape, slacks, rounds: int, reps: int, target_ms: float, l2_bytes: int, num_sms: int) -> dict:
    from vllm_flashmla import flash_mla_with_kvcache
    from vllm_flashmla._layout import D_V
    from vllm_flashmla.reference import mla_decode_reference

    inp = bd.make_inputs(shape, 0, "cuda")
    kv, calls = bd.kv_rotation(inp, l2_bytes)
    n = len(kv)
    # Every request checked (bench_decode.py's baseline has four): most cut ones are in the middle.
    ref_out, ref_lse = mla_decode_reference(inp.q, inp.k_cache, inp.block_table, inp.seqlens, head_dim_v=D_V,
                                            softmax_scale=inp.scale, causal=inp.causal)  # fmt: skip
    base = bd.Baseline("reference", list(range(shape.b)), ref_out, ref_lse)
    rows = shape.s_q * shape.h_q
    plans = plans_for(inp.seqlens_cpu.tolist(), num_sm_parts_for(num_sms, rows), rows, slacks)
    graphs, alive = {}, []
    for name, op in plans.items():
        order = torch.tensor(op.order, device="cuda")
        q, block_table, seqlens = (t[order].contiguous() for t in (inp.q, inp.block_table, inp.seqlens))
        records = torch.tensor([r.to_ints() for r in op.plan.records], dtype=torch.int32, device="cuda")
        splits = torch.tensor(op.plan.num_splits, dtype=torch.int32, device="cuda")
        out = torch.empty(shape.b, shape.s_q, shape.h_q, D_V, dtype=torch.bfloat16, device="cuda")
        alive.append((q, block_table, seqlens, records, splits, out))
        graph, (o_out, o_lse) = bd.capture(
            lambda i, q=q, bt=block_table, sl=seqlens, rec=records, sp=splits, out=out: flash_mla_with_kvcache(
                q, kv[i % n], bt, sl, D_V, rec, sp, softmax_scale=inp.scale, causal=inp.causal, out=out,
                check_seqlens=False,
            ),
            calls,
        )  # fmt: skip
        out.fill_(float("nan"))  # what the replay leaves unwritten fails the check
        graph.replay()
        torch.cuda.synchronize()
        back = torch.argsort(order)  # the inverse permutation
        fields = bd.compare(o_out[back], o_lse[back], base)
        if "error" in fields:
            raise RuntimeError(f"{shape} under plan {name}: {fields['error']}")
        graphs[name] = graph
    names = list(graphs)
    best = {name: float("inf") for name in names}
    for r in range(rounds):  # each plan alone, the order rotated every round
        for name in names[r % len(names):] + names[: r % len(names)]:
            best[name] = min(best[name], bd.time_graphs([graphs[name]], calls, reps, target_ms)[0])
    return {
        **shape.as_dict(),
        "us": {name: round(t, 3) for name, t in best.items()},
        "split_pieces": {name: split_pieces(op.plan) for name, op in plans.items()},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slacks", default="0,4", help="comma-separated slack values of the chained plans (pages)")
    p.add_argument("--rounds", type=int, default=3, help="timings of each plan per shape; the fastest counts")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--target-ms", type=float, default=20.0, help="GPU time per repetition")
    p.add_argument("--out", required=True, help="results JSON")
    args = p.parse_args()
    slacks = tuple(int(x) for x in args.slacks.split(","))
    props = torch.cuda.get_device_properties(0)
    commit, dirty = git_state()
    doc = {"gpu": props.name, "git_commit": commit, "git_dirty": dirty, "command": " ".join(sys.argv), "rows": []}
    for shape in SHAPES:
        row = sweep_shape(shape, slacks, args.rounds, args.reps, args.target_ms, props.L2_cache_size,
                          props.multi_processor_count)  # fmt: skip
        doc["rows"].append(row)
        write_json(args.out, doc)
        main_us = row["us"]["main"]
        cells = (f"{name} {t:8.1f} x{main_us / t:.3f} ({row['split_pieces'][name]})" for name, t in row["us"].items())
        print(f"{shape.s_k:6d} {shape.h_q:4d} {shape.s_q} " + " ".join(cells), flush=True)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
