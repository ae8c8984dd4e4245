"""The plans benchmarks/sweep_plans.py times: chained plans over a permuted batch cover every page once,
with the slots the kernel expects, and cut fewer requests than the budget plan; the checker it runs
before timing catches plans that do not."""

import dataclasses
import random
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_decode as bd  # noqa: E402
import sweep_plans as sp  # noqa: E402

from vllm_flashmla.scheduler import num_pages_of, num_sm_parts_for  # noqa: E402


def grid_seqlens(shape):
    return bd.make_seqlens(shape, np.random.default_rng(bd.shape_seed(0, shape))).tolist()


@pytest.mark.parametrize("seed", range(200))
def test_every_plan_covers_a_random_batch(seed):
    rng = random.Random(seed)
    b = rng.choice([1, 2, 5, 31, 64, 128, 131, 132, 133, 300])
    kind = rng.choice(["normal", "uniform", "spiky", "empty"])
    if kind == "normal":
        seqlens = [max(0, int(rng.gauss(4096, 2048))) for _ in range(b)]
    elif kind == "uniform":
        seqlens = [rng.choice([1, 64, 65, 2000])] * b
    elif kind == "spiky":
        seqlens = [rng.choice([0, 1, 64, 100000]) for _ in range(b)]
    else:
        seqlens = [0] * b
    rows = rng.choice([1, 16, 32, 64, 128, 256])
    parts = num_sm_parts_for(rng.choice([132, 78, 8]), rows)
    plans = sp.plans_for(seqlens, parts, rows, (0, 4))  # runs check_plan on each
    for op in plans.values():
        assert sorted(op.order) == list(range(b))
        assert len(op.plan.records) == parts


@pytest.mark.parametrize("shape", sp.SHAPES, ids=str)
def test_chained_best_fit_cuts_fewer_requests_than_the_budget_plan(shape):
    rows = shape.s_q * shape.h_q
    plans = sp.plans_for(grid_seqlens(shape), num_sm_parts_for(132, rows), rows, (4,))
    assert sp.split_pieces(plans["chain-best-4"].plan) < sp.split_pieces(plans["main"].plan)


def test_a_chained_plan_visits_a_cut_request_across_consecutive_parts():
    shape = bd.Shape(128, 8192, 64, 1, True)
    seqlens = grid_seqlens(shape)
    op = sp.plans_for(seqlens, 132, 64, (4,))["chain-best-4"]
    parts_of = {}
    for p, pos, *_ in op.plan.walk([num_pages_of(seqlens[r]) for r in op.order]):
        parts_of.setdefault(pos, []).append(p)
    assert all(ps == list(range(ps[0], ps[0] + len(ps))) for ps in parts_of.values())
    assert max(len(ps) for ps in parts_of.values()) >= 2


def broken(plan, **changes):
    records = list(plan.records)
    records[0] = dataclasses.replace(records[0], **changes)
    return dataclasses.replace(plan, records=records)


def test_the_checker_refuses_a_plan_that_drops_or_repeats_pages():
    seqlens = [5000, 70, 9000, 3000] * 16
    pages = [num_pages_of(s) for s in seqlens]
    plan = sp.plans_for(seqlens, 132, 16, (0,))["main"].plan
    sp.check_plan(plan, pages)
    first = plan.records[0]
    with pytest.raises(AssertionError):
        sp.check_plan(broken(plan, end_page=first.end_page - 1), pages)
    with pytest.raises(AssertionError):
        sp.check_plan(broken(plan, begin_page=first.begin_page + 1), pages)
    split = next(r for r in plan.records[1:] if r.begin_page > 0)
    i = plan.records.index(split)
    records = list(plan.records)
    records[i] = dataclasses.replace(split, begin_slot=split.begin_slot + 1)
    with pytest.raises(AssertionError):
        sp.check_plan(dataclasses.replace(plan, records=records), pages)


def test_the_checker_refuses_a_piece_past_its_requests_end():
    # Pages [0, 7) then [7, 5) of a 5-page request chain together and end at its page count, but the
    # kernel would read block-table entries past the request's pages.
    seqlens = [5 * 64, 64]
    plan = sp.plans_for(seqlens, 2, 16, (0,))["main"].plan
    records = [dataclasses.replace(plan.records[0], begin_req=0, begin_page=0, end_req=0, end_page=7),
               dataclasses.replace(plan.records[1], begin_req=0, begin_page=7, end_req=1, end_page=1, begin_slot=1)]
    broken_plan = dataclasses.replace(plan, records=records, num_splits=[0, 2, 3])
    with pytest.raises(AssertionError, match=r"has a piece \[0, 7\)"):
        sp.check_plan(broken_plan, [num_pages_of(s) for s in seqlens])

