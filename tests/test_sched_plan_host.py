"""The device scheduler's budget plan (csrc/sched_plan.h), compiled for the host with the system C++
compiler, against the Python model (vllm_flashmla/scheduler.py) on many random batches. The GPU tests
compare the whole device scheduler with the model on a few batches; this runs everywhere."""

from __future__ import annotations

import os
import random
import shutil
import subprocess

import pytest

from vllm_flashmla.scheduler import _plan_budget, budget_of, num_pages_of

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX = shutil.which("c++") or shutil.which("g++")

# Reads "b num_sm_parts budget overhead pages..." per line; prints each record's five fields, then
# num_splits[1..b], as one line.
DRIVER = r"""
#include <cstdio>
#include <vector>

#include "sched_plan.h"

int main() {
  int b, parts, budget, overhead;
  while (std::scanf("%d %d %d %d", &b, &parts, &budget, &overhead) == 4) {
    std::vector<int32_t> per_req(b);
    for (auto& pages : per_req) std::scanf("%d", &pages);
    std::vector<vllm_flashmla::SchedRecord> records(parts);
    vllm_flashmla::plan_budget(per_req.data(), records.data(), b, parts, budget, overhead);
    for (const auto& r : records) std::printf("%d %d %d %d %d ", r.begin_req, r.begin_page, r.end_req, r.end_page, r.begin_slot);
    for (int32_t splits : per_req) std::printf("%d ", splits);
    std::printf("\n");
  }
}
"""


@pytest.fixture(scope="module")
def plan_budget_host(tmp_path_factory):
    if CXX is None:
        pytest.skip("needs a C++ compiler (c++ or g++)")
    tmp = tmp_path_factory.mktemp("sched_plan")
    (tmp / "driver.cpp").write_text(DRIVER)
    exe = tmp / "plan_budget"
    subprocess.run([CXX, "-std=c++17", "-O1", "-I", os.path.join(REPO_ROOT, "csrc"), str(tmp / "driver.cpp"), "-o", str(exe)],
                   check=True)
    return str(exe)


def random_pages(rng: random.Random, b: int) -> list[int]:
    kind = rng.choice(["uniform", "normal", "mixed"])
    if kind == "uniform":
        seqlens = [rng.choice([1, 64, 4096, 8192, 32768])] * b
    elif kind == "normal":
        mean = rng.choice([300, 2000, 8192, 30000])
        seqlens = [min(max(round(rng.gauss(mean, mean / 2)), 1), 2 * mean) for _ in range(b)]
    else:  # empty requests, page edges and long ones together
        seqlens = [rng.choice([0, 1, 63, 64, 65, 300, 4097, 40000]) for _ in range(b)]
    return [num_pages_of(s) for s in seqlens]


def test_budget_plan_matches_python_model(plan_budget_host):
    rng = random.Random(0)
    cases = []
    for _ in range(2000):
        b = rng.choice([1, 2, 31, 32, 33, 64, 128, 131, 132, 133, 300, 1000, 4096])
        parts = rng.choice([1, 2, 33, 64, 66, 132])
        overhead = rng.choice([3, 5])
        pages = random_pages(rng, b)
        budget = budget_of(pages, parts, overhead)
        # A quarter of the cases get a tighter budget than the scheduler's, down to one page a piece,
        # so that the last part has to take the rest.
        if rng.random() < 0.25:
            budget = rng.randint(overhead + 1, budget)
        cases.append((pages, parts, budget, overhead))
    stdin = "".join(f"{len(p)} {parts} {budget} {o} {' '.join(map(str, p))}\n" for p, parts, budget, o in cases)
    lines = subprocess.run([plan_budget_host], input=stdin, capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(lines) == len(cases)
    for (pages, parts, budget, overhead), line in zip(cases, lines):
        plan = _plan_budget(pages, parts, budget, overhead)
        values = [int(x) for x in line.split()]
        records = [tuple(values[5 * i : 5 * i + 5]) for i in range(parts)]
        expected = [(r.begin_req, r.begin_page, r.end_req, r.end_page, r.begin_slot) for r in plan.records]
        assert records == expected, (pages, parts, budget, overhead)
        assert values[5 * parts :] == plan.num_splits[1:], (pages, parts, budget, overhead)
