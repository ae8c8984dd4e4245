"""CPU checks of the split planner's Python model (the GPU tests compare the device kernel with it)."""

import random

import pytest

from vllm_flashmla._layout import (
    FEW_ROWS,
    FEW_ROWS_OVERHEAD_PAGES,
    FIXED_OVERHEAD_PAGES,
    SCHED_RECORD_INTS,
    SchedRecord,
)
from vllm_flashmla.scheduler import (
    _plan_budget,
    budget_of,
    budget_plan_balances_better,
    cheapest_piece,
    cut_overhead_pages,
    num_pages_of,
    num_sm_parts_for,
    piece_cost,
    pieces_of,
    plan_splits,
    smallest_piece,
)


def covered_pages(plan, seqlens):
    """Every (request, page) a part covers, and the slots it writes for split requests."""
    seen = {}
    for part, req, first, end, _ in plan.walk([num_pages_of(s) for s in seqlens]):
        assert first < end or num_pages_of(seqlens[req]) == 0, "a part holds an empty piece of a request"
        seen.setdefault(req, []).append((part, first, end))
    return seen


CASES = [
    [0],
    [1],
    [64, 65, 63],
    [0, 0, 0, 5000],
    [163840],
    [4096] * 128,
    [16384] * 128,
    [16384] * 100,
    [random.Random(s).choice([0, 1, 64, 65, 1000, 20000]) for s in range(300)],
    [random.Random(7 + s).randint(1, 16384) for s in range(4096)],
]


@pytest.mark.parametrize("seqlens", CASES, ids=lambda s: f"b{len(s)}")
@pytest.mark.parametrize("num_sm_parts", [1, 7, 66, 132])
@pytest.mark.parametrize("rows", [16, 128])
def test_every_page_covered_exactly_once(seqlens, num_sm_parts, rows):
    plan = plan_splits(seqlens, num_sm_parts, rows)
    assert len(plan.records) == num_sm_parts
    seen = covered_pages(plan, seqlens)
    assert sorted(seen) == list(range(len(seqlens))), "every request, empty ones too, is owned by some part"
    for req, pieces in seen.items():
        pieces.sort(key=lambda p: p[1])
        pos = 0
        for _, first, end in pieces:
            assert first == pos
            pos = end
        assert pos == num_pages_of(seqlens[req])
        splits = plan.num_splits[req + 1] - plan.num_splits[req]
        assert splits == len(pieces)


@pytest.mark.parametrize("seqlens", CASES, ids=lambda s: f"b{len(s)}")
@pytest.mark.parametrize("rows,parts", [(16, 132), (128, 66)])
def test_split_slots_are_distinct_and_bounded(seqlens, rows, parts):
    plan = plan_splits(seqlens, parts, rows)
    assert plan.num_splits[0] == 0 and plan.num_splits == sorted(plan.num_splits)
    assert plan.num_splits[-1] <= len(seqlens) + parts, "partial buffers hold b + num_sm_parts slots"
    slots = [slot for _, _, _, _, slot in plan.walk([num_pages_of(s) for s in seqlens])]
    assert len(slots) == len(set(slots))


@pytest.mark.parametrize("rows", [FEW_ROWS, FEW_ROWS + 1, 64])
def test_balance_within_one_request_overhead(rows):
    seqlens = [random.Random(s).randint(1, 30000) for s in range(200)]
    parts = 132
    overhead = cut_overhead_pages(rows)
    plan = plan_splits(seqlens, parts, rows)
    cost = [0] * parts
    for part, _, first, end, _ in plan.walk([num_pages_of(s) for s in seqlens]):
        cost[part] += end - first + overhead
    ideal = (sum(map(num_pages_of, seqlens)) + overhead * len(seqlens)) / parts
    assert max(cost) <= ideal + 2 * overhead + 1


def test_few_requests_within_budget_get_a_part_each():
    # 128 x 256 pages on 132 parts: budget 259 pages. Cutting each request at the budget would leave
    # 2-page pieces, each with a whole fixed overhead, a partial and a combine; one part per request
    # instead overshoots the budget by 2 pages. The choice is priced with FIXED_OVERHEAD_PAGES also for
    # 16-row tiles, whose cut overhead would make the budget 255 pages and split every request.
    assert budget_of([256] * 128, 132, FEW_ROWS_OVERHEAD_PAGES) < 256
    plan = plan_splits([16384] * 128, 132, 16)
    assert plan.num_splits == list(range(129))
    assert plan.records[:128] == [SchedRecord(i, 0, i, 256, i) for i in range(128)]
    assert all(r.begin_req > r.end_req for r in plan.records[128:])
    # Uneven lengths within the budget: still one part each, never two requests in one part.
    seqlens = [16384 - 64 * (i % 7) for i in range(128)]
    plan = plan_splits(seqlens, 132, 64)
    assert [(r.begin_req, r.end_req) for r in plan.records[:128]] == [(i, i) for i in range(128)]


def test_few_short_requests_are_cut_into_even_pieces_one_per_part():
    # 32 x 16 pages on 66 parts (h_q = 128): one part each would leave 34 parts idle; pieces of 8
    # pages fill 64 parts, each with one piece.
    plan = plan_splits([1024] * 32, 66, 128)
    assert plan.num_splits == list(range(0, 65, 2))
    assert plan.records[:64] == [SchedRecord(i // 2, 8 * (i % 2), i // 2, 8 * (i % 2) + 8, i) for i in range(64)]
    assert all(r.begin_req > r.end_req for r in plan.records[64:])


def test_split_multi_tile_requests_take_the_budget_plan_when_pieces_cost_more():
    # 32 x 512 pages on 66 parts with 128 rows: pieces of 256 pages (+5) fill only 64 parts, more than
    # the budget of 256 a part carries when all 66 share the work; the budget plan uses every part.
    assert budget_of([512] * 32, 66) == 256 and smallest_piece([512] * 32, 66) == 256
    plan = plan_splits([32768] * 32, 66, 128)
    assert all(r.begin_req <= r.end_req for r in plan.records)
    assert plan == _plan_budget([512] * 32, 66, 256, FIXED_OVERHEAD_PAGES)
    # One tile (16 rows) keeps the pieces, and so do pieces that split nothing (one request per part).
    assert plan_splits([32768] * 32, 132, 16).num_splits == list(range(0, 129, 4))
    assert plan_splits([16384] * 64, 66, 128).num_splits == list(range(65))


@pytest.mark.parametrize("parts", [1, 7, 66, 132])
@pytest.mark.parametrize("seed", range(20))
def test_smallest_piece_is_the_smallest_that_fits(parts, seed):
    rng = random.Random(seed)
    pages = [rng.choice([0, 1, 2, 16, 100, 2560]) for _ in range(rng.randint(1, parts))]
    piece = smallest_piece(pages, parts)
    assert sum(pieces_of(p, piece) for p in pages) <= parts
    assert piece == 1 or sum(pieces_of(p, piece - 1) for p in pages) > parts


@pytest.mark.parametrize("seqlens", CASES, ids=lambda s: f"b{len(s)}")
@pytest.mark.parametrize("num_sm_parts", [7, 66, 132])
@pytest.mark.parametrize("rows", [16, 128])
def test_piece_plans_hold_one_piece_per_part(seqlens, num_sm_parts, rows):
    pages = [num_pages_of(s) for s in seqlens]
    if len(pages) > num_sm_parts:
        pytest.skip("more requests than parts: a budget plan, whose parts may run across requests")
    fit, budget = smallest_piece(pages, num_sm_parts), budget_of(pages, num_sm_parts)
    if fit > budget:
        pytest.skip("the fitting piece exceeds the budget: a budget plan")
    piece = cheapest_piece(pages, fit, rows)
    if budget_plan_balances_better(piece, max(pages), budget, rows, FIXED_OVERHEAD_PAGES):
        pytest.skip("multi-tile requests split into pieces dearer than the budget: a budget plan")
    plan = plan_splits(seqlens, num_sm_parts, rows)
    busy = [r for r in plan.records if r.begin_req <= r.end_req]
    assert len(busy) == plan.num_splits[-1] == sum(pieces_of(p, piece) for p in pages)
    assert all(r.begin_req == r.end_req and r.end_page - r.begin_page <= piece for r in busy)


@pytest.mark.parametrize(
    "seqlens,parts",
    [([64 * 400] * 128, 132), ([16384] * 100, 132), ([16384] * 128, 66), ([1024] * 4, 132), ([8192], 132)],
    ids=["longer_than_budget", "fewer_requests_than_parts", "more_requests_than_parts", "b4", "b1"],
)
def test_requests_are_split_when_that_uses_more_parts(seqlens, parts):
    plan = plan_splits(seqlens, parts, 16)
    assert plan.num_splits[-1] > len(seqlens)


def test_idle_parts_are_empty_ranges():
    plan = plan_splits([10, 10], 8, 16)
    idle = [r for r in plan.records if r.begin_req > r.end_req]
    assert idle, "two tiny requests cannot occupy eight parts"
    assert all(r == SchedRecord(2, 0, 1, 0, 0) for r in idle)


def test_record_round_trip():
    rec = SchedRecord(3, 4, 5, 6, 7)
    ints = rec.to_ints()
    assert len(ints) == SCHED_RECORD_INTS and ints[5:] == [0, 0, 0]
    assert SchedRecord.from_ints(ints) == rec


@pytest.mark.parametrize("rows,parts", [(16, 132), (64, 132), (65, 66), (128, 66), (256, 33), (1024, 8)])
def test_num_sm_parts(rows, parts):
    assert num_sm_parts_for(132, rows) == parts


def test_plans_for_other_overheads():
    # benchmarks/sweep_sched_overhead.py times the plans the kernel would make with other constants.
    seqlens = [random.Random(s).randint(1, 30000) for s in range(200)]
    assert plan_splits(seqlens, 132, 64) == plan_splits(seqlens, 132, 64, FIXED_OVERHEAD_PAGES)
    # More requests than parts, so budget plans, whose budget and cuts follow the overhead: the kernel's
    # for a few-rows tile is FEW_ROWS_OVERHEAD_PAGES.
    assert plan_splits(seqlens, 132, FEW_ROWS) == plan_splits(seqlens, 132, FEW_ROWS, FEW_ROWS_OVERHEAD_PAGES)
    assert plan_splits(seqlens, 132, 16, 2).records != plan_splits(seqlens, 132, 16, 8).records


@pytest.mark.parametrize(
    "seqlens,parts,rows,piece",
    [
        # 128 rows: one-page pieces write more partial rows than they save pages (perf notes, round 7)
        ([1024] * 4, 66, 128, 2),  # 64 pages: 32 pieces of 2 instead of 64 of 1
        ([8192], 66, 128, 3),  # 128 pages: 43 pieces of 3 instead of 64 of 2
        # 16 rows: partials are cheap, the shortest pieces that fit stay
        ([8192], 132, 16, 1),
        ([1024] * 4, 132, 16, 1),
        # long requests: the fitted pieces are already long enough
        ([32768], 66, 128, 8),
        ([1024] * 32, 66, 128, 8),
        ([16384] * 128, 132, 64, 256),
    ],
)
def test_piece_length_follows_the_partial_cost(seqlens, parts, rows, piece):
    plan = plan_splits(seqlens, parts, rows)
    busy = [r for r in plan.records if r.begin_req <= r.end_req]
    assert max(r.end_page - r.begin_page for r in busy) == piece
    pages = [num_pages_of(s) for s in seqlens]
    assert plan.num_splits[-1] == sum(pieces_of(p, piece) for p in pages)


@pytest.mark.parametrize("seed", range(30))
def test_cheapest_piece_never_costs_more_than_the_fitted_one(seed):
    rng = random.Random(seed)
    parts = rng.choice([66, 132])
    rows = rng.choice([1, 16, 64, 128, 256, 1024])
    pages = [rng.choice([0, 1, 3, 16, 100, 512, 2560]) for _ in range(rng.randint(1, parts))]
    fit = smallest_piece(pages, parts)
    piece = cheapest_piece(pages, fit, rows)
    assert fit <= piece <= max(max(pages), 1)
    assert sum(pieces_of(p, piece) for p in pages) <= parts
    assert piece_cost(pages, piece, rows) <= piece_cost(pages, fit, rows)
    assert piece == fit or piece_cost(pages, piece, rows) < piece_cost(pages, fit, rows)


def test_cut_overhead_follows_the_rows():
    assert [cut_overhead_pages(r) for r in (1, FEW_ROWS, FEW_ROWS + 1, 128)] == [
        FEW_ROWS_OVERHEAD_PAGES,
        FEW_ROWS_OVERHEAD_PAGES,
        FIXED_OVERHEAD_PAGES,
        FIXED_OVERHEAD_PAGES,
    ]
    # Varlen requests longer than the budget: a budget plan either way, cut by the rows' overhead.
    seqlens = [random.Random(s).randint(1, 2 * 8192) for s in range(128)]
    few, more = plan_splits(seqlens, 132, FEW_ROWS), plan_splits(seqlens, 132, FEW_ROWS + 1)
    assert more == plan_splits(seqlens, 132, FEW_ROWS + 1, FIXED_OVERHEAD_PAGES)
    assert few == plan_splits(seqlens, 132, FEW_ROWS, FEW_ROWS_OVERHEAD_PAGES) and few.records != more.records
