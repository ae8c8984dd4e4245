"""Pure-PyTorch reference of paged MLA decode: the specification every kernel test compares against.

Runs on any device (CPU included) with float32 accumulation and reads only what the kernel may read:
for request i, the first ceil(seqlen / 64) entries of its block-table row and, in those pages, the
first seqlen keys. Semantics (FlashMLA's):

* out[i, t, h] = softmax(scale * q[i, t, h] . K^T) V over the keys query t may see; V is the first
  head_dim_v columns of the cache row (K and V share the latent).
* causal=True with s_q > 1: the queries are the request's last s_q tokens, so query t sees the first
  seqlen - (s_q - 1 - t) keys. causal has no effect when s_q == 1.
* lse[i, h, t] is the natural-log log-sum-exp of the scaled scores; a query that sees no key
  (seqlen == 0, or a causal row with nothing visible) gets out = 0 and lse = +inf.
"""

from __future__ import annotations

import math

import torch

from ._layout import D_V


def mla_decode_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int = D_V,
    softmax_scale: float | None = None,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out [b, s_q, h_q, head_dim_v] in q's dtype, lse [b, h_q, s_q] float32)."""
    b, s_q, h_q, d_qk = q.shape
    if softmax_scale is None:
        softmax_scale = d_qk**-0.5
    pages = k_cache.reshape(k_cache.shape[0], k_cache.shape[1], d_qk)  # [num_pages, page_size, d_qk]
    page_size = pages.shape[1]
    seqlens = [int(x) for x in cache_seqlens.tolist()]

    out = torch.zeros(b, s_q, h_q, head_dim_v, dtype=torch.float32, device=q.device)
    lse = torch.full((b, h_q, s_q), math.inf, dtype=torch.float32, device=q.device)
    for i, seqlen in enumerate(seqlens):
        if seqlen == 0:
            continue
        page_ids = block_table[i, : (seqlen + page_size - 1) // page_size].long()
        keys = pages[page_ids].reshape(-1, d_qk)[:seqlen].float()  # [seqlen, d_qk]
        scores = torch.einsum("thd,kd->thk", q[i].float(), keys) * softmax_scale  # [s_q, h_q, seqlen]
        if causal:
            visible = seqlen - (s_q - 1 - torch.arange(s_q, device=q.device))  # [s_q]
            hidden = torch.arange(seqlen, device=q.device)[None, :] >= visible[:, None]  # [s_q, seqlen]
            scores = scores.masked_fill(hidden[:, None, :], -math.inf)
        row_lse = torch.logsumexp(scores, dim=-1)  # [s_q, h_q]; -inf where nothing is visible
        seen = torch.isfinite(row_lse)
        probs = torch.exp(scores - row_lse[..., None]).nan_to_num(nan=0.0)
        out[i] = torch.einsum("thk,kd->thd", probs, keys[:, :head_dim_v]) * seen[..., None]
        lse[i] = torch.where(seen, row_lse, torch.full_like(row_lse, math.inf)).transpose(0, 1)
    return out.to(q.dtype), lse


__all__ = ["mla_decode_reference"]
