"""CPU checks of the reference implementation: the oracle of every kernel test must itself be right."""

import math

import pytest
import torch

from vllm_flashmla._layout import D_QK, D_V
from vllm_flashmla._layout import PAGE_SIZE as PAGE  # noqa: N811
from vllm_flashmla.reference import mla_decode_reference


def paged(b, s_q, h_q, seqlens, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    pages = [math.ceil(s / PAGE) for s in seqlens]
    num_pages = sum(pages) + 2
    k_cache = torch.full((num_pages, PAGE, 1, D_QK), float("nan"), dtype=dtype)
    block_table = torch.full((b, max(pages) + 1), 2**31 - 1, dtype=torch.int32)
    perm = torch.randperm(num_pages, generator=gen)
    dense = []
    start = 0
    for i, (s, n) in enumerate(zip(seqlens, pages)):
        ids = perm[start : start + n]
        start += n
        block_table[i, :n] = ids.to(torch.int32)
        keys = torch.randn(s, D_QK, generator=gen, dtype=dtype)
        buf = torch.full((n * PAGE, D_QK), float("nan"), dtype=dtype)
        buf[:s] = keys
        k_cache[ids.long(), :, 0] = buf.view(n, PAGE, D_QK)
        dense.append(keys)
    q = torch.randn(b, s_q, h_q, D_QK, generator=gen, dtype=dtype)
    return q, k_cache, block_table, torch.tensor(seqlens, dtype=torch.int32), dense


def dense_attention(q_i, keys, scale, visible):
    scores = (q_i.double() @ keys.double().T) * scale
    scores[..., visible:] = -math.inf
    lse = torch.logsumexp(scores, -1)
    return torch.softmax(scores, -1) @ keys[:, :D_V].double(), lse


@pytest.mark.parametrize("causal", [False, True])
def test_matches_dense_attention_on_gathered_pages(causal):
    seqlens = [1, 63, 64, 65, 200]
    b, s_q, h_q = len(seqlens), 3, 4
    q, k_cache, block_table, cache_seqlens, dense = paged(b, s_q, h_q, seqlens)
    out, lse = mla_decode_reference(q, k_cache, block_table, cache_seqlens, causal=causal)
    assert not torch.isnan(out).any()
    scale = D_QK**-0.5
    for i, keys in enumerate(dense):
        for t in range(s_q):
            visible = seqlens[i] - (s_q - 1 - t) if causal else seqlens[i]
            if visible <= 0:
                assert torch.all(out[i, t] == 0) and torch.all(torch.isinf(lse[i, :, t]))
                continue
            want_o, want_lse = dense_attention(q[i, t], keys, scale, visible)
            torch.testing.assert_close(out[i, t].double(), want_o, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(lse[i, :, t].double(), want_lse, atol=1e-5, rtol=1e-5)


def test_permuting_pages_does_not_change_the_result():
    q, k_cache, block_table, cache_seqlens, _ = paged(3, 2, 8, [130, 64, 7], seed=1)
    out, lse = mla_decode_reference(q, k_cache, block_table, cache_seqlens, causal=True)
    perm = torch.randperm(k_cache.shape[0], generator=torch.Generator().manual_seed(9))
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel())
    moved = k_cache[perm]  # page p now lives at inverse[p]
    valid = block_table != 2**31 - 1
    moved_table = torch.where(valid, inverse[block_table.clamp_max(perm.numel() - 1).long()].to(torch.int32), block_table)
    out2, lse2 = mla_decode_reference(q, moved, moved_table, cache_seqlens, causal=True)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)


def test_zero_length_and_fully_masked_rows():
    q, k_cache, block_table, cache_seqlens, _ = paged(2, 4, 2, [0, 2], seed=2)
    out, lse = mla_decode_reference(q, k_cache, block_table, cache_seqlens, causal=True)
    assert torch.all(out[0] == 0) and torch.all(lse[0] == math.inf)
    # request 1 has 2 keys and 4 queries: query t sees 2 - (3 - t) keys, so t = 0, 1 see none
    assert torch.all(out[1, :2] == 0) and torch.all(lse[1, :, :2] == math.inf)
    assert torch.isfinite(lse[1, :, 2:]).all()


def test_causal_is_a_no_op_for_single_query():
    q, k_cache, block_table, cache_seqlens, _ = paged(2, 1, 4, [100, 5], seed=3)
    a = mla_decode_reference(q, k_cache, block_table, cache_seqlens, causal=False)
    b = mla_decode_reference(q, k_cache, block_table, cache_seqlens, causal=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_split_merge_algebra_matches_unsplit():
    """Merging two key ranges by LSE gives the full result: the rule combine.cu implements."""
    q, k_cache, block_table, cache_seqlens, dense = paged(1, 1, 4, [300], seed=4)
    keys = dense[0]
    scale = D_QK**-0.5
    o1, l1 = dense_attention(q[0, 0], keys[:100], scale, 100)
    o2, l2 = dense_attention(q[0, 0], keys[100:], scale, 200)
    lse = torch.logaddexp(l1, l2)
    merged = torch.exp(l1 - lse)[:, None] * o1 + torch.exp(l2 - lse)[:, None] * o2
    out, ref_lse = mla_decode_reference(q, k_cache, block_table, cache_seqlens)
    torch.testing.assert_close(merged, out[0, 0].double(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse[0, :, 0].double(), atol=1e-5, rtol=1e-5)
