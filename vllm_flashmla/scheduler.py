"""Python model of the split-KV scheduler in csrc/scheduler.cu (same algorithm, same integers).

The CPU tests check its invariants; the GPU tests check that the device kernel produces exactly the
records and split counts computed here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ._layout import BLOCK_M, FIXED_OVERHEAD_PAGES, PAGE_SIZE, SchedRecord


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


def plan_splits(
    cache_seqlens: Sequence[int], num_sm_parts: int, fixed_overhead_pages: int = FIXED_OVERHEAD_PAGES
) -> SchedulePlan:
    """The device scheduler's plan. `fixed_overhead_pages` other than the kernel's constant gives the
    plan the device would make with that constant (benchmarks/sweep_sched_overhead.py times them)."""
    b = len(cache_seqlens)
    pages = [num_pages_of(int(s)) for s in cache_seqlens]
    total = sum(pages) + fixed_overhead_pages * b
    budget = (total + num_sm_parts - 1) // num_sm_parts + fixed_overhead_pages
    part_per_request = b <= num_sm_parts and max(pages, default=0) <= budget

    records: list[SchedRecord] = []
    num_splits = [0] * (b + 1)
    req = page = splits_before = pieces_of_req = 0
    for part in range(num_sm_parts):
        if req >= b:
            records.append(SchedRecord(b, 0, b - 1, 0, 0))
            continue
        begin = (req, page, splits_before + pieces_of_req)
        end_req, end_page = b - 1, 0
        if part + 1 == num_sm_parts:
            remaining = None  # the last part takes the rest
        else:
            remaining = pages[req] + fixed_overhead_pages if part_per_request else budget
        while req < b:
            left = pages[req] - page
            if remaining is None or left + fixed_overhead_pages <= remaining:
                if remaining is not None:
                    remaining -= left + fixed_overhead_pages
                end_req, end_page = req, pages[req]
                splits_before += pieces_of_req + 1
                num_splits[req + 1] = splits_before
                req, page, pieces_of_req = req + 1, 0, 0
            else:
                take = remaining - fixed_overhead_pages
                if take > 0:
                    end_req, end_page = req, page + take
                    page += take
                    pieces_of_req += 1
                break
        records.append(SchedRecord(begin[0], begin[1], end_req, end_page, begin[2]))
    return SchedulePlan(records, num_splits)
