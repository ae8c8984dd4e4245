"""Call vllm-flashmla's kernels directly, outside vLLM, and check them against the PyTorch reference.

Builds a random paged KV cache (64-token pages of 576 = 512 latent + 64 RoPE columns, shuffled
through one pool as an allocator leaves them), computes the split-KV schedule once, runs the
decode and compares it with vllm_flashmla.reference.mla_decode_reference:

    python examples/kernel_call.py
    python examples/kernel_call.py --b 64 --s-q 2 --h-q 128 --max-seqlen 8192 --causal --dtype fp16

Needs an sm90 (Hopper) GPU.
"""

import argparse
import math

import torch

from vllm_flashmla import flash_mla_with_kvcache, get_mla_metadata
from vllm_flashmla._layout import D_QK, D_V, PAGE_SIZE
from vllm_flashmla.reference import mla_decode_reference

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Expected error of the kernel (P is rounded to the input dtype before P @ V, as in FlashMLA).
OUT_TOL = {torch.bfloat16: dict(atol=1.5e-2, rtol=2e-2), torch.float16: dict(atol=2e-3, rtol=5e-3)}
LSE_TOL = dict(atol=2e-3, rtol=1e-4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--b", type=int, default=8, help="requests")
    parser.add_argument("--s-q", type=int, default=1, help="query tokens per request (>1: speculative decoding)")
    parser.add_argument("--h-q", type=int, default=16, help="query heads")
    parser.add_argument("--max-seqlen", type=int, default=2048, help="cache_seqlens are drawn from [0, max]")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    dtype, device = DTYPES[args.dtype], "cuda"
    b, s_q, h_q = args.b, args.s_q, args.h_q

    cache_seqlens = torch.randint(0, args.max_seqlen + 1, (b,), dtype=torch.int32, device=device)
    max_pages = math.ceil(args.max_seqlen / PAGE_SIZE)
    num_pages = b * max_pages
    block_table = torch.randperm(num_pages, dtype=torch.int32, device=device).view(b, max_pages)
    k_cache = torch.randn(num_pages, PAGE_SIZE, 1, D_QK, dtype=dtype, device=device)
    q = torch.randn(b, s_q, h_q, D_QK, dtype=dtype, device=device)
    # DeepSeek scales by 1/sqrt(qk_nope_head_dim + qk_rope_head_dim) = 1/sqrt(192), not 1/sqrt(576).
    softmax_scale = 192**-0.5

    # Once per decode step, shared by every layer.
    tile_scheduler_metadata, num_splits = get_mla_metadata(cache_seqlens, s_q * h_q, 1)
    out, lse = flash_mla_with_kvcache(
        q,
        k_cache,
        block_table,
        cache_seqlens,
        D_V,
        tile_scheduler_metadata,
        num_splits,
        softmax_scale=softmax_scale,
        causal=args.causal,
    )
    ref_out, ref_lse = mla_decode_reference(
        q, k_cache, block_table, cache_seqlens, head_dim_v=D_V, softmax_scale=softmax_scale, causal=args.causal
    )

    print(f"q {tuple(q.shape)} {args.dtype}, k_cache {tuple(k_cache.shape)}, cache_seqlens {cache_seqlens.tolist()}")
    print(f"schedule: {tile_scheduler_metadata.shape[0]} SM parts, num_splits {num_splits.tolist()}")
    print(f"out {tuple(out.shape)}: max |out - ref| = {(out.float() - ref_out.float()).abs().max().item():.3e}")
    torch.testing.assert_close(out.float(), ref_out.float(), **OUT_TOL[dtype])
    seen = torch.isfinite(ref_lse)  # +inf where a query sees no key (seqlen 0)
    assert torch.equal(seen, torch.isfinite(lse)), "lse is +inf at different positions than the reference"
    torch.testing.assert_close(lse[seen], ref_lse[seen], **LSE_TOL)
    print("matches the reference")


if __name__ == "__main__":
    main()
