"""Python model of the split-KV scheduler in csrc/scheduler.cu (same algorithm, same integers).

The CPU tests check its invariants; the GPU tests check that the device kernel produces exactly the
records and split counts computed here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

from ._layout import (
    BLOCK_M,
    FEW_ROWS,
    FEW_ROWS_OVERHEAD_PAGES,
    FIXED_OVERHEAD_PAGES,
    PAGE_SIZE,
    PARTIAL_ROWS_PER_PAGE,
    SchedRecord,
)


def num_pages_of(seqlen: int) -> int:
    return (seqlen + PAGE_SIZE - 1) // PAGE_SIZE


def num_sm_parts_for(num_sms: int, num_q_tokens_per_head_k: int) -> int:
    """Parts per query tile so that (tiles x parts) fills the GPU with one CTA per SM."""
    num_m_blocks = (num_q_tokens_per_head_k + BLOCK_M - 1) // BLOCK_M
    return max(num_sms // num_m_blocks, 1)


@dataclass(frozen=True)
class SchedulePlan:
    records: list[SchedRecord]
    num_splits: list[int]  # [b + 1] exclusive prefix sum of the parts covering each request

    def walk(self, pages: Sequence[int]) -> Iterator[tuple[int, int, int, int, int]]:
        """(part, request, first page, end page, slot) of every piece, as the decode kernel reads the
        plan (csrc/sched_meta.h: first_page, end_page, partial_slot); the slot is meaningful only for a
        split request."""
        for part, rec in enumerate(self.records):
            for req in range(rec.begin_req, rec.end_req + 1):
                first = rec.begin_page if req == rec.begin_req else 0
                end = rec.end_page if req == rec.end_req else pages[req]
                slot = rec.begin_slot if req == rec.begin_req else self.num_splits[req]
                yield part, req, first, end, slot


def pieces_of(pages: int, piece_pages: int) -> int:
    """Parts a request of `pages` takes in a plan of pieces of at most piece_pages (an empty request
    still needs one part, which writes its zero output)."""
    return max(1, (pages + piece_pages - 1) // piece_pages)


def cut_overhead_pages(num_q_rows: int) -> int:
    """Overhead by which the budget plan cuts requests of num_q_rows query rows (sched_meta.h)."""
    return FEW_ROWS_OVERHEAD_PAGES if num_q_rows <= FEW_ROWS else FIXED_OVERHEAD_PAGES


def budget_of(pages: Sequence[int], num_sm_parts: int, overhead: int = FIXED_OVERHEAD_PAGES) -> int:
    """Cost a part may carry: the average cost per part, each request costing its pages plus
    `overhead`, plus one overhead more for the request piece a part may start mid-request."""
    total = sum(pages) + overhead * len(pages)
    return (total + num_sm_parts - 1) // num_sm_parts + overhead


def idle_record(b: int) -> SchedRecord:
    """A part with nothing to do (end_req < begin_req)."""
    return SchedRecord(b, 0, b - 1, 0, 0)


def smallest_piece(pages: Sequence[int], num_sm_parts: int) -> int:
    """The smallest piece length (pages) that cuts every request into at most num_sm_parts pieces
    in all; requires len(pages) <= num_sm_parts. Bisection, as in the kernel."""
    lo, hi = 1, max(max(pages, default=0), 1)  # hi always fits: one piece per request
    while lo < hi:
        mid = (lo + hi) // 2
        if sum(pieces_of(p, mid) for p in pages) <= num_sm_parts:
            hi = mid
        else:
            lo = mid + 1
    return hi


def piece_cost(pages: Sequence[int], piece: int, num_q_rows: int) -> int:
    """Modeled cost of a piece plan, in partial rows (PARTIAL_ROWS_PER_PAGE of them per page): the
    longest piece, plus the fp32 partial rows that the pieces of split requests write and the combine
    reads back."""
    split_pieces = sum(k for k in (pieces_of(p, piece) for p in pages) if k > 1)
    return piece * PARTIAL_ROWS_PER_PAGE + num_q_rows * split_pieces


def cheapest_piece(pages: Sequence[int], fit: int, num_q_rows: int) -> int:
    """The piece length of the piece plan: `fit` (the smallest that fits the parts) or, when longer
    pieces cost less by piece_cost, the better of the two integers around the continuous optimum
    sqrt(num_q_rows * total_pages / PARTIAL_ROWS_PER_PAGE). Ties go to the shorter piece."""
    longest = max(max(pages, default=0), 1)
    root = math.isqrt(num_q_rows * sum(pages) // PARTIAL_ROWS_PER_PAGE)
    best, best_cost = fit, piece_cost(pages, fit, num_q_rows)
    for cand in (root, root + 1):
        if fit < cand <= longest:
            cost = piece_cost(pages, cand, num_q_rows)
            if cost < best_cost:
                best, best_cost = cand, cost
    return best


def budget_plan_balances_better(piece: int, longest: int, budget: int, num_q_rows: int, overhead: int) -> bool:
    """Multi-tile requests that the piece plan splits anyway, into pieces dearer than the budget plan's
    parts, take the budget plan (sched_meta.h)."""
    return num_q_rows > BLOCK_M and piece < longest and piece + overhead > budget


def plan_splits(
    cache_seqlens: Sequence[int],
    num_sm_parts: int,
    num_q_rows: int,
    overhead: int | None = None,
) -> SchedulePlan:
    """The device scheduler's plan for requests of num_q_rows (s_q * h_q) query rows each: the plan
    is chosen with FIXED_OVERHEAD_PAGES, and the budget plan cuts with cut_overhead_pages(num_q_rows).
    An `overhead` gives the plan the device would make if both were that value
    (benchmarks/sweep_sched_overhead.py times them)."""
    pages = [num_pages_of(int(s)) for s in cache_seqlens]
    choice = FIXED_OVERHEAD_PAGES if overhead is None else overhead
    if len(pages) <= num_sm_parts:
        fit = smallest_piece(pages, num_sm_parts)
        budget = budget_of(pages, num_sm_parts, choice)
        if fit <= budget:
            piece = cheapest_piece(pages, fit, num_q_rows)
            if not budget_plan_balances_better(piece, max(pages, default=0), budget, num_q_rows, choice):
                return _plan_pieces(pages, num_sm_parts, piece)
    cut = cut_overhead_pages(num_q_rows) if overhead is None else overhead
    return _plan_budget(pages, num_sm_parts, budget_of(pages, num_sm_parts, cut), cut)


def _plan_pieces(pages: list[int], num_sm_parts: int, piece: int) -> SchedulePlan:
    """Every part holds one piece of at most `piece` pages of one request."""
    b = len(pages)
    records: list[SchedRecord] = []
    num_splits = [0] * (b + 1)
    for req, n in enumerate(pages):
        for i in range(pieces_of(n, piece)):  # every piece takes one part and the slot of that index
            records.append(SchedRecord(req, i * piece, req, min(n, (i + 1) * piece), len(records)))
        num_splits[req + 1] = len(records)
    records += [idle_record(b)] * (num_sm_parts - len(records))
    return SchedulePlan(records, num_splits)


def _plan_budget(pages: list[int], num_sm_parts: int, budget: int, overhead: int) -> SchedulePlan:
    """Parts take contiguous (request, page) runs costing up to `budget`, each request piece costing
    its pages plus `overhead`; a request that does not fit the rest of a part is cut and continues in
    the next one."""
    b = len(pages)
    records: list[SchedRecord] = []
    num_splits = [0] * (b + 1)
    req = page = splits_before = pieces_of_req = 0
    for part in range(num_sm_parts):
        if req >= b:
            records.append(idle_record(b))
            continue
        begin = (req, page, splits_before + pieces_of_req)
        end_req, end_page = b - 1, 0
        remaining = None if part + 1 == num_sm_parts else budget  # the last part takes the rest
        while req < b:
            left = pages[req] - page
            if remaining is None or left + overhead <= remaining:
                if remaining is not None:
                    remaining -= left + overhead
                end_req, end_page = req, pages[req]
                splits_before += pieces_of_req + 1
                num_splits[req + 1] = splits_before
                req, page, pieces_of_req = req + 1, 0, 0
            else:
                take = remaining - overhead
                if take > 0:
                    end_req, end_page = req, page + take
                    page += take
                    pieces_of_req += 1
                break
        records.append(SchedRecord(begin[0], begin[1], end_req, end_page, begin[2]))
    return SchedulePlan(records, num_splits)
