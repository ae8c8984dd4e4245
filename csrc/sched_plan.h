// The budget plan (csrc/scheduler.cu), written once for the device, where the scheduler kernel runs it
// on one lane, and for the host, where tests/test_sched_plan_host.py compiles it and compares it with
// the Python model on many more batches than the GPU tests can afford.
#pragma once

#include <climits>
#include <cstdint>

#include "sched_meta.h"

namespace vllm_flashmla {

VLLM_FLASHMLA_HOST_DEVICE SchedRecord idle_record(int b) { return SchedRecord{b, 0, b - 1, 0, 0}; }

// One thread: contiguous (request, page) runs of up to `budget` per part, in request order, each
// request piece costing its pages plus `overhead`. A part always takes some of the request it opens
// on (budget > overhead), and the last part takes whatever is left. Needs b >= 1 (it reads per_req[0]
// first; the binding returns before launching for an empty batch).
//   per_req  [b]             pages of each request on entry; num_splits[req + 1] on return
//   records  [num_sm_parts]  the plan
VLLM_FLASHMLA_HOST_DEVICE void plan_budget(int32_t* per_req, SchedRecord* records, int b, int num_sm_parts,
                                           int budget, int overhead) {
  int part = 0;  // the open part
  int slot = 0;  // next partial slot: num_splits[req] + the parts that already took pages of req
  int remaining = num_sm_parts == 1 ? INT_MAX : budget;
  SchedRecord rec{0, 0, 0, 0, 0};
  int pages = per_req[0];
  for (int req = 0; req < b; ++req) {
    const int next_pages = req + 1 < b ? per_req[req + 1] : 0;  // read ahead of the loop-carried work
    int page = 0;                                                // first page of req not yet placed
    while (pages - page + overhead > remaining) {  // the rest of req does not fit: cut it, close the part
      const int take = remaining - overhead;
      if (take > 0) {
        rec.end_req = req;
        rec.end_page = page + take;
        page += take;
        ++slot;
      }
      records[part++] = rec;
      rec = SchedRecord{req, page, 0, 0, slot};
      remaining = part + 1 == num_sm_parts ? INT_MAX : budget;
    }
    remaining -= pages - page + overhead;  // the rest of req fits: finish it here
    rec.end_req = req;
    rec.end_page = pages;
    per_req[req] = ++slot;
    pages = next_pages;
  }
  records[part++] = rec;
  for (; part < num_sm_parts; ++part) records[part] = idle_record(b);
}

}  // namespace vllm_flashmla
