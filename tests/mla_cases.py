"""Random paged-KV decode problems with everything the kernel must not read poisoned, shared by the
GPU tests, the sanitizer run and the correctness/perf script."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vllm_flashmla._layout import D_QK, PAGE_SIZE

INVALID_PAGE = 2**31 - 1  # in unused block-table slots: any read of it is a bug
NUM_SPARE_PAGES = 3  # NaN pages that no request owns; unused slots point at them too


@dataclass
class Problem:
    q: torch.Tensor  # [b, s_q, h_q, D_QK]
    k_cache: torch.Tensor  # [num_pages, PAGE_SIZE, 1, D_QK]
    block_table: torch.Tensor  # [b, max_pages] int32
    cache_seqlens: torch.Tensor  # [b] int32
    causal: bool


def seqlens_for(kind: str, b: int, gen: torch.Generator) -> list[int]:
    """'N' -> every request N keys; 'normal:M' -> Normal(M, M/2) clipped to [1, 2M]; 'mixed' -> with zeros."""
    if kind.startswith("normal:"):
        mean = int(kind.split(":")[1])
        x = torch.randn(b, generator=gen) * (mean / 2) + mean
        return [int(v) for v in x.clamp(1, 2 * mean).round().tolist()]
    if kind == "mixed":
        choices = [0, 1, 63, 64, 65, 127, 300, 1000, 4097]
        idx = torch.randint(len(choices), (b,), generator=gen).tolist()
        return [choices[i] for i in idx]
    return [int(kind)] * b


def make_problem(b: int, s_q: int, h_q: int, seqlens: list[int], dtype: torch.dtype, causal: bool, seed: int,
                 device: str = "cuda") -> Problem:
    gen = torch.Generator().manual_seed(seed)
    pages_per_req = [math.ceil(s / PAGE_SIZE) for s in seqlens]
    max_pages = max(pages_per_req + [0]) + 2  # trailing slots stay unused
    used = sum(pages_per_req)
    num_pages = used + NUM_SPARE_PAGES
    perm = torch.randperm(num_pages, generator=gen)

    # Unused slots alternate between an id past the cache (the TMA map reads such a page as zeros, so only
    # the numbers show a read of it) and a spare page of NaN keys, which turns any read of it into NaN.
    spare = perm[used:]
    slot = torch.arange(max_pages).unsqueeze(0) + torch.arange(b).unsqueeze(1)
    block_table = torch.where(slot % 2 == 0, spare[slot % NUM_SPARE_PAGES], INVALID_PAGE).to(torch.int32)
    k_cache = torch.full((num_pages, PAGE_SIZE, 1, D_QK), float("nan"), dtype=dtype)
    start = 0
    for i, (seqlen, n) in enumerate(zip(seqlens, pages_per_req)):
        pages = perm[start : start + n]
        start += n
        block_table[i, :n] = pages.to(torch.int32)
        if seqlen:
            keys = torch.randn(seqlen, D_QK, generator=gen).to(dtype)
            padded = torch.full((n * PAGE_SIZE, D_QK), float("nan"), dtype=dtype)
            padded[:seqlen] = keys
            k_cache[pages.long(), :, 0, :] = padded.view(n, PAGE_SIZE, D_QK)
    q = torch.randn(b, s_q, h_q, D_QK, generator=gen).to(dtype)
    return Problem(
        q=q.to(device),
        k_cache=k_cache.to(device),
        block_table=block_table.to(device),
        cache_seqlens=torch.tensor(seqlens, dtype=torch.int32, device=device),
        causal=causal,
    )


# Error budget per dtype: the kernel rounds P to the input type before PV (as FlashMLA and FA3 do) and
# rounds the output; everything else is fp32. Values are max-abs on outputs of magnitude <= ~1.
OUT_TOL = {torch.bfloat16: dict(atol=1.5e-2, rtol=2e-2), torch.float16: dict(atol=2e-3, rtol=5e-3)}
REL_ERR = {torch.bfloat16: 1e-2, torch.float16: 2e-3}  # ||out - ref|| / ||ref|| of each request
LSE_TOL = dict(atol=2e-3, rtol=1e-4)


def compare(out, lse, ref_out, ref_lse, dtype) -> dict:
    """Raise AssertionError unless (out, lse) matches the reference; return error stats. The relative
    error is bounded per request: in a batch of mixed lengths the short requests' outputs are the
    largest, and one norm over the batch would let a long request be a few percent off."""
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    assert not torch.isnan(out).any(), "NaN in out"
    assert not torch.isnan(lse).any(), "NaN in lse"
    inf_ok = torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    assert inf_ok, "lse inf positions differ from the reference"
    o, r = out.float(), ref_out.float()
    max_err = (o - r).abs().max().item() if o.numel() else 0.0
    torch.testing.assert_close(o, r, **OUT_TOL[dtype])
    rel = 0.0
    if o.numel():
        ref_norm = r.flatten(1).norm(dim=1)
        seen = ref_norm > 0  # requests with no key have out = 0, which assert_close checked
        per_req = (o - r).flatten(1).norm(dim=1)[seen] / ref_norm[seen]
        if per_req.numel():
            worst = int(per_req.argmax())
            rel = per_req[worst].item()
            req = int(seen.nonzero()[worst])
            assert rel <= REL_ERR[dtype], f"relative error {rel:.2e} > {REL_ERR[dtype]:.0e} in request {req}"
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], **LSE_TOL)
    return {"max_abs_err": max_err, "rel_err": rel}
