"""Public API, with DeepSeek FlashMLA's calling convention:

    tile_scheduler_metadata, num_splits = get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)
    out, lse = flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, 512,
                                      tile_scheduler_metadata, num_splits, softmax_scale, causal)

Compute the metadata once per decode step (it depends only on cache_seqlens and s_q * h_q) and reuse it
for every layer. Each call synchronizes with the host once, to check cache_seqlens, unless a CUDA graph
is being captured, torch.compile is tracing, or check_seqlens=False (as the vLLM backend passes).
Neither allocates outside PyTorch's caching allocator, so both can be captured in CUDA graphs, and
both trace into one graph under torch.compile(fullgraph=True). Every argument is validated here, and a
bad one raises TypeError/ValueError (RuntimeError for a GPU that is not sm90) naming the argument, what
was expected and what was given; while torch.compile traces, the address alignment checks are left to
the ops themselves (a traced tensor has no address), which raise RuntimeError.
"""

from __future__ import annotations

import math
import operator

import torch

from ._layout import D_QK, D_ROPE, D_V, H_KV, PAGE_SIZE, SCHED_RECORD_INTS
from ._ops import ops, try_load
from .scheduler import num_sm_parts_for

try_load()

INT32_MAX = 2**31 - 1  # the scheduler counts pages in int32

_DTYPES = (torch.bfloat16, torch.float16)


def _require_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _require_dtype(name: str, t: torch.Tensor, expected: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in expected:
        names = " or ".join(str(d).replace("torch.", "") for d in expected)
        raise TypeError(f"{name} must be {names}, got {str(t.dtype).replace('torch.', '')}")


def _require_rank(name: str, t: torch.Tensor, rank: int, layout: str) -> None:
    if t.dim() != rank:
        raise ValueError(f"{name} must be {rank}-D {layout}, got shape {tuple(t.shape)}")


def _require_contiguous(name: str, t: torch.Tensor) -> None:
    # The kernels index these as dense arrays through their data pointers.
    if not t.is_contiguous():
        raise ValueError(
            f"{name} must be contiguous, got strides {t.stride()} for shape {tuple(t.shape)}; pass {name}.contiguous()"
        )


_DEVICE_FACTS: dict[int, tuple[tuple[int, int], int, str]] = {}


def _device_facts(index: int) -> tuple[tuple[int, int], int, str]:
    # A dict rather than functools.cache, which torch.compile traces through with a warning.
    if index not in _DEVICE_FACTS:
        props = torch.cuda.get_device_properties(index)
        _DEVICE_FACTS[index] = (props.major, props.minor), props.multi_processor_count, props.name
    return _DEVICE_FACTS[index]


def _misaligned(t: torch.Tensor) -> bool:
    """t does not start on a 16-byte boundary. Not known while torch.compile traces (no addresses
    then): the ops check it again when they run."""
    return not torch.compiler.is_compiling() and t.data_ptr() % 16 != 0


def _require_hopper(name: str, t: torch.Tensor) -> int:
    """Check that t lives on an sm90 GPU; return the device's SM count."""
    if t.device.type != "cuda":
        raise ValueError(
            f"{name} must be on a CUDA device (the kernels run on Hopper GPUs), got device '{t.device}'. "
            "Move the tensors to the GPU, or use vllm_flashmla.reference.mla_decode_reference on the CPU."
        )
    capability, num_sms, gpu = _device_facts(t.device.index if t.device.index is not None else 0)
    check_capability(capability, gpu)
    return num_sms


def check_capability(capability: tuple[int, int], gpu: str) -> None:
    """The kernels are compiled for sm90a only: Hopper (H100/H800/H200/H20)."""
    major, minor = capability
    if (major, minor) != (9, 0):
        raise RuntimeError(
            f"vllm_flashmla requires an sm90a (Hopper: H100/H800/H200) GPU, found sm_{major}{minor} ({gpu}). "
            "On other GPUs select another vLLM attention backend."
        )


def _require_same_device(reference_name: str, reference: torch.Tensor, **others: torch.Tensor) -> None:
    for name, t in others.items():
        if t.device != reference.device:
            raise ValueError(f"{name} must be on {reference_name}'s device {reference.device}, got {t.device}")


def _positive_int(value) -> int | None:
    """value as a Python int if it is a positive integer (numpy and torch integer scalars too, not bool)."""
    if isinstance(value, bool):
        return None
    try:
        value = operator.index(value)
    except TypeError:
        return None
    return value if value >= 1 else None


def get_mla_metadata(
    cache_seqlens: torch.Tensor, num_q_tokens_per_head_k: int, num_heads_k: int, *, check_seqlens: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-KV schedule for one decode step.

    Args:
        cache_seqlens: int32 [b] on the GPU, keys per request (0 allowed).
        num_q_tokens_per_head_k: s_q * h_q // h_kv, query rows per request.
        num_heads_k: h_kv; MLA has exactly 1.
        check_seqlens: verify on the host that cache_seqlens are >= 0 and that their pages can be counted
            in int32 (one sync; skipped during CUDA-graph capture and torch.compile tracing). The scheduler
            plans in shared memory from these counts.

    Returns:
        tile_scheduler_metadata: int32 [num_sm_parts, 8], one record per part (csrc/sched_meta.h).
        num_splits: int32 [b + 1], exclusive prefix sum of the parts each request is split over.
    """
    cache_seqlens = _require_tensor("cache_seqlens", cache_seqlens)
    _require_dtype("cache_seqlens", cache_seqlens, (torch.int32,))
    _require_rank("cache_seqlens", cache_seqlens, 1, "[b]")
    if num_heads_k != H_KV:
        raise ValueError(f"num_heads_k must be {H_KV} (MLA shares one latent KV head), got {num_heads_k}")
    num_q_rows = _positive_int(num_q_tokens_per_head_k)
    if num_q_rows is None:
        raise ValueError(f"num_q_tokens_per_head_k (s_q * h_q) must be a positive int, got {num_q_tokens_per_head_k!r}")
    num_sms = _require_hopper("cache_seqlens", cache_seqlens)
    if check_seqlens:
        _check_seqlens_plannable(cache_seqlens)
    num_sm_parts = num_sm_parts_for(num_sms, num_q_rows)
    b = cache_seqlens.shape[0]
    records = torch.empty(num_sm_parts, SCHED_RECORD_INTS, dtype=torch.int32, device=cache_seqlens.device)
    num_splits = torch.empty(b + 1, dtype=torch.int32, device=cache_seqlens.device)
    if b == 0:  # nothing to plan: the op returns before its kernel, and num_splits[0] is still 0
        num_splits.zero_()
    ops().get_mla_metadata(cache_seqlens.contiguous(), num_sm_parts, num_q_rows, records, num_splits)
    return records, num_splits


def _seqlen_extent(cache_seqlens: torch.Tensor) -> tuple[int, int] | None:
    """(longest, total) of cache_seqlens, refusing a negative one, read with one host sync; None when
    there is nothing to read, a CUDA graph is being captured or torch.compile is tracing (the values are
    not known then)."""
    if (
        cache_seqlens.numel() == 0
        or torch.compiler.is_compiling()
        or (cache_seqlens.is_cuda and torch.cuda.is_current_stream_capturing())
    ):
        return None
    shortest, longest, total = torch.stack(
        [cache_seqlens.min().long(), cache_seqlens.max().long(), cache_seqlens.sum(dtype=torch.int64)]
    ).tolist()
    if shortest < 0:
        raise ValueError(f"cache_seqlens must be >= 0, got a minimum of {shortest}")
    return longest, total


def _check_seqlens_plannable(cache_seqlens: torch.Tensor) -> None:
    """Seqlens the scheduler can plan: none negative, and pages (also summed) within int32."""
    extent = _seqlen_extent(cache_seqlens)
    if extent is None:
        return
    longest, total = extent
    # Pages per request round up: at most total / PAGE_SIZE + b of them in all.
    if longest > INT32_MAX - PAGE_SIZE or total // PAGE_SIZE + cache_seqlens.numel() > INT32_MAX:
        raise ValueError(
            f"cache_seqlens hold {total} keys in all (longest {longest}): more {PAGE_SIZE}-token pages than "
            "the scheduler counts in int32; split the batch"
        )


def _check_seqlens_fit(cache_seqlens: torch.Tensor, max_pages: int) -> None:
    """cache_seqlens >= 0 and <= max_pages * 64."""
    extent = _seqlen_extent(cache_seqlens)
    if extent is None:
        return
    longest, _ = extent
    if longest > max_pages * PAGE_SIZE:
        raise ValueError(
            f"cache_seqlens holds a sequence of {longest} tokens but block_table has {max_pages} pages per "
            f"request (room for {max_pages * PAGE_SIZE} tokens); widen block_table or fix cache_seqlens"
        )


def _split_q(q) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q as one 576-wide tensor, or as vLLM hands it to an MLA backend: (latent [.., 512], rope [.., 64])."""
    if not isinstance(q, tuple):
        return _require_tensor("q", q), None
    if len(q) != 2:
        raise TypeError(
            f"q given as a tuple must be (q_latent [b, s_q, h_q, {D_V}], q_rope [b, s_q, h_q, {D_ROPE}]), "
            f"got a tuple of {len(q)}"
        )
    return _require_tensor("q[0] (latent)", q[0]), _require_tensor("q[1] (rope)", q[1])


def _check_q_part(name: str, t: torch.Tensor) -> None:
    if t.stride(-1) != 1:
        raise ValueError(f"{name}'s last dim must be contiguous (stride 1), got stride {t.stride(-1)}")
    if any(s % 8 for s in t.stride()[:-1]) or _misaligned(t):
        raise ValueError(
            f"{name}'s rows must be 16-byte aligned (strides multiple of 8 elements), got strides {t.stride()}"
        )


def flash_mla_with_kvcache(
    q: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    tile_scheduler_metadata: torch.Tensor,
    num_splits: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    *,
    out: torch.Tensor | None = None,
    check_seqlens: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paged MLA decode attention.

    Args:
        q: [b, s_q, h_q, 576] bf16/fp16, last dim contiguous; or its two parts as a tuple (q_latent
            [b, s_q, h_q, 512], q_rope [b, s_q, h_q, 64]), e.g. views of separate buffers, read in place
            with their own strides. Only with a head count that neither divides 64 nor is a multiple of 64
            (e.g. 20) and s_q > 1 is a part whose s_q stride is not h_q head strides copied first.
        k_cache: [num_pages, 64, 1, 576] (or [num_pages, 64, 576]) of q's dtype; V is its first 512 columns.
        block_table: int32 [b, max_pages], page ids of each request in order.
        cache_seqlens: int32 [b], keys per request; 0 gives out = 0 and lse = +inf.
        head_dim_v: 512.
        tile_scheduler_metadata, num_splits: from get_mla_metadata for this step's cache_seqlens and s_q * h_q.
        softmax_scale: defaults to 576 ** -0.5.
        causal: with s_q > 1, query t of a request sees its first seqlen - (s_q - 1 - t) keys.
        out: optional preallocated contiguous [b, s_q, h_q, 512] output of q's dtype, 16-byte aligned.
        check_seqlens: verify cache_seqlens fit block_table (one host sync; skipped during graph capture and
            torch.compile tracing).

    Returns:
        out [b, s_q, h_q, 512] of q's dtype and lse [b, h_q, s_q] float32 (natural log).
    """
    q, q_rope = _split_q(q)
    tensors = dict(
        q=q,
        k_cache=k_cache,
        block_table=block_table,
        cache_seqlens=cache_seqlens,
        tile_scheduler_metadata=tile_scheduler_metadata,
        num_splits=num_splits,
    )
    for name, value in tensors.items():
        _require_tensor(name, value)

    q_name = "q" if q_rope is None else "q[0] (latent)"
    _require_dtype(q_name, q, _DTYPES)
    _require_rank(q_name, q, 4, "[b, s_q, h_q, d_qk]" if q_rope is None else f"[b, s_q, h_q, {D_V}]")
    b, s_q, h_q, d_q = q.shape
    if s_q < 1 or h_q < 1:
        raise ValueError(
            f"q must hold at least one query token and one head per request (s_q >= 1, h_q >= 1), got shape "
            f"{tuple(q.shape)}"
        )
    if q_rope is None and d_q != D_QK:
        raise ValueError(
            f"q's head dim (d_qk = 512 latent + 64 rope) must be {D_QK}, got {d_q}; pass the two parts as a tuple "
            f"(q_latent, q_rope) if they are separate tensors"
        )
    if q_rope is not None:
        if d_q != D_V:
            raise ValueError(f"q[0] (latent) must have a head dim of {D_V}, got {d_q}")
        if q_rope.dtype != q.dtype:
            raise TypeError(f"q[1] (rope) dtype must match q[0] ({q.dtype}), got {q_rope.dtype}")
        if tuple(q_rope.shape) != (b, s_q, h_q, D_ROPE):
            raise ValueError(
                f"q[1] (rope) must be [b, s_q, h_q, {D_ROPE}] = {(b, s_q, h_q, D_ROPE)}, got {tuple(q_rope.shape)}"
            )
        _check_q_part("q[1] (rope)", q_rope)
        tensors["q_rope"] = q_rope
    if head_dim_v != D_V:
        raise ValueError(f"head_dim_v must be {D_V} (the latent width), got {head_dim_v}")
    _check_q_part(q_name, q)

    if k_cache.dtype != q.dtype:
        raise TypeError(f"k_cache dtype must match q ({q.dtype}), got {k_cache.dtype}")
    if k_cache.dim() == 3:
        k_cache = k_cache.unsqueeze(2)
    _require_rank("k_cache", k_cache, 4, "[num_pages, page_size, h_kv, d_qk]")
    num_pages, page_size, h_kv, d_k = k_cache.shape
    if page_size != PAGE_SIZE:
        raise ValueError(
            f"k_cache page size (dim 1) must be {PAGE_SIZE}, got {page_size}; reshape larger pages into "
            f"64-token pages (and expand block_table) or use a {PAGE_SIZE}-token KV block size"
        )
    if h_kv != H_KV:
        raise ValueError(f"k_cache must have h_kv = {H_KV} (dim 2), got {h_kv}")
    if d_k != D_QK:
        raise ValueError(f"k_cache head dim must be {D_QK}, got {d_k}")
    if num_pages == 0:  # the kernels' TMA map of the cache needs at least one page
        raise ValueError("k_cache must hold at least one page, got shape " + str(tuple(k_cache.shape)))
    if k_cache.stride(-1) != 1 or k_cache.stride(0) % 8 or k_cache.stride(1) % 8 or _misaligned(k_cache):
        raise ValueError(
            f"k_cache must have a contiguous last dim and 16-byte aligned rows and pages, got strides {k_cache.stride()}"
        )

    _require_dtype("block_table", block_table, (torch.int32,))
    _require_rank("block_table", block_table, 2, "[b, max_pages]")
    if block_table.shape[0] != b or block_table.stride(-1) != 1:
        raise ValueError(f"block_table must be [b={b}, max_pages] with a contiguous last dim, got shape {tuple(block_table.shape)}")
    _require_dtype("cache_seqlens", cache_seqlens, (torch.int32,))
    if tuple(cache_seqlens.shape) != (b,):
        raise ValueError(f"cache_seqlens must be [b={b}], got shape {tuple(cache_seqlens.shape)}")
    _require_contiguous("cache_seqlens", cache_seqlens)

    _require_dtype("tile_scheduler_metadata", tile_scheduler_metadata, (torch.int32,))
    _require_dtype("num_splits", num_splits, (torch.int32,))
    if tuple(num_splits.shape) != (b + 1,):
        raise ValueError(
            f"num_splits must be [b + 1 = {b + 1}] (metadata computed for this batch), got shape "
            f"{tuple(num_splits.shape)}; call get_mla_metadata with this step's cache_seqlens"
        )
    _require_contiguous("num_splits", num_splits)

    num_sms = _require_hopper("q", q)
    _require_same_device("q", q, **{k: v for k, v in tensors.items() if k != "q"})
    expected_parts = num_sm_parts_for(num_sms, s_q * h_q)
    if tuple(tile_scheduler_metadata.shape) != (expected_parts, SCHED_RECORD_INTS):
        raise ValueError(
            f"tile_scheduler_metadata must be [{expected_parts}, {SCHED_RECORD_INTS}] for s_q * h_q = {s_q * h_q}, "
            f"got shape {tuple(tile_scheduler_metadata.shape)}; it was computed for a different "
            f"num_q_tokens_per_head_k: call get_mla_metadata(cache_seqlens, {s_q * h_q}, 1)"
        )
    _require_contiguous("tile_scheduler_metadata", tile_scheduler_metadata)

    if softmax_scale is None:
        softmax_scale = D_QK**-0.5
    if not (isinstance(softmax_scale, (int, float)) and math.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(f"softmax_scale must be a positive finite float, got {softmax_scale!r}")

    if out is None:
        out = torch.empty(b, s_q, h_q, D_V, dtype=q.dtype, device=q.device)
    else:
        _require_tensor("out", out)
        if out.shape != (b, s_q, h_q, D_V) or out.dtype != q.dtype or out.device != q.device or not out.is_contiguous():
            raise ValueError(
                f"out must be a contiguous {(b, s_q, h_q, D_V)} {q.dtype} tensor on {q.device}, got "
                f"{tuple(out.shape)} {out.dtype} on {out.device} (contiguous={out.is_contiguous()})"
            )
        if _misaligned(out):
            raise ValueError(
                f"out must start at a 16-byte aligned address (the kernels store 16-byte pieces of its rows), got "
                f"address {out.data_ptr():#x}; pass a freshly allocated tensor or a view at a multiple of 8 elements"
            )
    if check_seqlens:
        _check_seqlens_fit(cache_seqlens, block_table.shape[1])

    lse = torch.empty(b, h_q, s_q, dtype=torch.float32, device=q.device)
    slots = b + expected_parts  # each part adds at most one split beyond one per request
    o_accum = torch.empty(slots, s_q * h_q, D_V, dtype=torch.float32, device=q.device)
    lse_accum = torch.empty(slots, s_q * h_q, dtype=torch.float32, device=q.device)
    ops().decode(
        q,
        q_rope,
        k_cache,
        block_table,
        cache_seqlens,
        tile_scheduler_metadata,
        num_splits,
        float(softmax_scale),
        bool(causal),
        out,
        lse,
        o_accum,
        lse_accum,
    )
    return out, lse
