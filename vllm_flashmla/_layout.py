"""Constants and the scheduler record layout, mirrored from csrc/config.h and csrc/sched_meta.h.

`check_against_extension()` compares them with what the compiled extension reports, so the two sides
cannot drift apart silently (tests/test_layout.py runs it wherever the extension is built).
"""

from __future__ import annotations

from dataclasses import astuple, dataclass, fields

D_V = 512  # latent ("NoPE") width, also the value width
D_ROPE = 64  # decoupled RoPE key width
D_QK = D_V + D_ROPE  # 576
PAGE_SIZE = 64  # tokens per KV page
H_KV = 1  # MLA: one latent KV head
BLOCK_M = 64  # packed query rows (s_q * h_q) per decode CTA tile (csrc/config.h)
# Largest h_q and s_q the kernels are tested for (tests/test_flash_mla.py); the vLLM backend enforces
# them. DeepSeek-V2/V3 have 128 query heads at TP1; MTP/speculative decode sends a few tokens.
MAX_H_Q = 128
MAX_S_Q = 8
FIXED_OVERHEAD_PAGES = 5  # scheduler cost of a request piece beyond its pages (see csrc/sched_meta.h)
FEW_ROWS = 16  # requests of at most this many query rows (s_q * h_q) ...
FEW_ROWS_OVERHEAD_PAGES = 3  # ... are cut by the budget plan with this overhead (ditto)
PARTIAL_ROWS_PER_PAGE = 2048  # scheduler: partial rows of split pieces that cost one page (ditto)
SCHED_RECORD_INTS = 8


@dataclass(frozen=True)
class SchedRecord:
    """One scheduler part: pages [begin_page, ...) of begin_req through [..., end_page) of end_req."""

    begin_req: int
    begin_page: int
    end_req: int  # inclusive; < begin_req for an idle part
    end_page: int
    begin_slot: int  # partial-output slot of begin_req in this part

    def to_ints(self) -> list[int]:
        values = list(astuple(self))
        return values + [0] * (SCHED_RECORD_INTS - len(values))

    @classmethod
    def from_ints(cls, ints) -> "SchedRecord":
        return cls(*(int(x) for x in list(ints)[: len(fields(cls))]))


def check_against_extension(layout_info: list[int]) -> None:
    """Raise if the extension's layout_info() disagrees with this module."""
    int32 = 4
    expected = [SCHED_RECORD_INTS * int32]
    expected += [i * int32 for i, _ in enumerate(fields(SchedRecord))]
    expected += [FIXED_OVERHEAD_PAGES, FEW_ROWS, FEW_ROWS_OVERHEAD_PAGES, PARTIAL_ROWS_PER_PAGE, D_QK, D_V, PAGE_SIZE, BLOCK_M]
    if list(layout_info) != expected:
        raise RuntimeError(
            "flashmla_kernels was built from sources whose scheduler layout or constants differ from "
            f"vllm_flashmla/_layout.py: extension reports {list(layout_info)}, Python expects {expected}. "
            "Rebuild the extension from this checkout (pip install --no-build-isolation -e .)."
        )
