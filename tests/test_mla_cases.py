"""The GPU tests' problems and checks (tests/mla_cases.py), on the CPU: the poison is where the kernel
must not read, the reference never touches it, and compare() catches errors of a few percent in any
one request."""

import pytest
import torch
from mla_cases import INVALID_PAGE, REL_ERR, compare, make_problem, seqlens_for

from vllm_flashmla.reference import mla_decode_reference


def problem():
    return make_problem(7, 2, 16, seqlens_for("mixed", 7, torch.Generator().manual_seed(0)), torch.bfloat16, True, 0,
                        device="cpu")


def test_unused_slots_hold_invalid_ids_and_nan_pages():
    p = problem()
    first_unused = []
    for i, seqlen in enumerate(p.cache_seqlens.tolist()):
        n = -(-seqlen // 64)
        for slot in p.block_table[i, n:].tolist():
            assert slot == INVALID_PAGE or torch.isnan(p.k_cache[slot].float()).all(), (i, slot)
        first_unused.append(p.block_table[i, n].item())
    # The page right after a request's last one, the likeliest wrong read, is of both kinds in the batch.
    assert INVALID_PAGE in first_unused and any(s != INVALID_PAGE for s in first_unused)


def test_reference_reads_none_of_the_poison():
    p = problem()
    out, lse = mla_decode_reference(p.q, p.k_cache, p.block_table, p.cache_seqlens, causal=True)
    assert torch.isfinite(out).all() and not torch.isnan(lse).any()
    compare(out.to(torch.bfloat16), lse, out, lse, torch.bfloat16)


@pytest.mark.parametrize("scale", [0.97, 1.03])
def test_compare_catches_one_long_request_a_few_percent_off(scale):
    p = problem()
    out, lse = mla_decode_reference(p.q, p.k_cache, p.block_table, p.cache_seqlens, causal=True)
    longest = int(p.cache_seqlens.argmax())
    bad = out.clone()
    bad[longest] *= scale
    assert (bad - out).norm() / out.norm() < REL_ERR[torch.bfloat16], "the batch-wide norm would pass it"
    with pytest.raises(AssertionError, match=f"in request {longest}"):
        compare(bad, lse, out, lse, torch.bfloat16)
