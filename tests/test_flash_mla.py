"""GPU tests of the decode kernels against vllm_flashmla.reference (skipped without an sm90 GPU).

Also a script: `python tests/test_flash_mla.py` prints correctness and speed per shape, and
`python tests/test_flash_mla.py --small` runs the small grid used under compute-sanitizer.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_decode  # noqa: E402  (vLLM's q layout, shared with the benchmark)
from mla_cases import compare, make_problem, seqlens_for  # noqa: E402

from vllm_flashmla import flash_mla_with_kvcache, get_mla_metadata  # noqa: E402
from vllm_flashmla._ops import ops  # noqa: E402
from vllm_flashmla.reference import mla_decode_reference  # noqa: E402
from vllm_flashmla.scheduler import plan_splits  # noqa: E402
from vllm_flashmla._layout import D_QK, D_ROPE, D_V, SCHED_RECORD_INTS, SchedRecord  # noqa: E402

pytestmark = pytest.mark.gpu


def run_ours(p):
    q0 = p.q[0] if isinstance(p.q, tuple) else p.q  # one 576-wide q, or (latent, rope)
    b, s_q, h_q, _ = q0.shape
    meta, splits = get_mla_metadata(p.cache_seqlens, s_q * h_q, 1)
    # NaN-filled, so that any piece of a row the kernels leave unwritten fails the comparison.
    out = torch.full((b, s_q, h_q, 512), float("nan"), dtype=q0.dtype, device=q0.device)
    return flash_mla_with_kvcache(p.q, p.k_cache, p.block_table, p.cache_seqlens, 512, meta, splits,
                                  causal=p.causal, out=out)


def check_case(b, s_q, h_q, seqlen_kind, dtype, causal, seed=0):
    gen = torch.Generator().manual_seed(seed)
    p = make_problem(b, s_q, h_q, seqlens_for(seqlen_kind, b, gen), dtype, causal, seed)
    out, lse = run_ours(p)
    ref_out, ref_lse = mla_decode_reference(p.q, p.k_cache, p.block_table, p.cache_seqlens, causal=causal)
    return compare(out, lse, ref_out, ref_lse, dtype)


# A covering grid rather than the full product: every value of every axis appears, in combinations
# that stress it (odd head counts with s_q > 1, zero lengths inside batches, long single requests).
GRID = (
    [(b, 1, 16, "mixed", torch.bfloat16, False) for b in (1, 2, 7, 64, 128)]
    + [(7, s_q, h, "mixed", torch.bfloat16, True) for s_q in (1, 2, 4, 8) for h in (1, 8, 16, 20, 32, 64, 128)]
    + [(2, 1, h, k, torch.bfloat16, False) for h in (16, 128) for k in ("0", "1", "63", "64", "65", "4096", "32768")]
    + [(64, 2, h, "normal:1024", dt, c) for h in (16, 128) for dt in (torch.bfloat16, torch.float16) for c in (False, True)]
    + [(128, 1, 128, "normal:512", torch.float16, False), (128, 4, 32, "normal:300", torch.bfloat16, True)]
    # fewer requests than parts, all within the budget: one part each, nothing split
    + [(100, 2, 16, "normal:300", torch.bfloat16, True)]
    # the limits: the largest batch and the longest DeepSeek context (160k tokens)
    + [(4096, 1, 16, "100", torch.bfloat16, False), (1, 2, 16, "163840", torch.bfloat16, True)]
)


@pytest.mark.parametrize("b,s_q,h_q,seqlens,dtype,causal", GRID)
def test_decode_matches_reference(b, s_q, h_q, seqlens, dtype, causal):
    check_case(b, s_q, h_q, seqlens, dtype, causal)


@pytest.mark.parametrize(
    "b,h_q,kind",
    [(1, 16, "100"), (128, 128, "normal:4096"), (64, 16, "mixed"), (500, 64, "normal:300"), (128, 16, "16384"),
     (100, 32, "normal:300"), (32, 128, "1024"), (4, 128, "1024"), (1, 128, "8192"), (128, 16, "normal:8192"),
     (300, 16, "normal:2000"), (32, 128, "32768"), (8, 256, "32768"), (16, 128, "normal:30000"),
     # the most pieces (one request over every part), and batches whose pages need opted-in shared memory
     (1, 16, "163840"), (4096, 16, "normal:300"), (20000, 16, "mixed")],
)
def test_scheduler_matches_python_model(b, h_q, kind):
    seqlens = seqlens_for(kind, b, torch.Generator().manual_seed(1))
    meta, splits = get_mla_metadata(torch.tensor(seqlens, dtype=torch.int32, device="cuda"), h_q, 1)
    plan = plan_splits(seqlens, meta.shape[0], h_q)
    assert [SchedRecord.from_ints(r) for r in meta.cpu().tolist()] == plan.records
    assert meta[:, 5:].eq(0).all()
    assert splits.cpu().tolist() == plan.num_splits


def test_deterministic():
    p = make_problem(64, 2, 64, seqlens_for("normal:2000", 64, torch.Generator().manual_seed(3)), torch.bfloat16, True, 3)
    out1, lse1 = run_ours(p)
    out2, lse2 = run_ours(p)
    assert torch.equal(out1, out2) and torch.equal(lse1, lse2)


# q as a view into a larger NaN-filled buffer. The kernel loads Q by TMA with the view's own token and
# head strides when h_q tiles the 64-row block (16 here); with other head counts (20) the packed rows
# need one stride between them, so views with a gap between tokens (spare heads) are copied first.
Q_VIEWS = {
    "wide_rows": lambda q: (q.shape[0], q.shape[1], q.shape[2], 640),
    "request_gap": lambda q: (q.shape[0], q.shape[1] + 1, q.shape[2], 576),
    "spare_heads": lambda q: (q.shape[0], q.shape[1], q.shape[2] + 8, 576),
}


@pytest.mark.parametrize("view", sorted(Q_VIEWS))
@pytest.mark.parametrize("h_q", [16, 20])
def test_q_views_into_larger_buffers(view, h_q):
    b, s_q, dtype = 6, 2, torch.bfloat16
    p = make_problem(b, s_q, h_q, [0, 1, 700, 64, 4097, 300], dtype, True, 11)
    big = torch.full(Q_VIEWS[view](p.q), float("nan"), dtype=dtype, device="cuda")
    q = big[:b, :s_q, :h_q, :576]
    q.copy_(p.q)
    assert not q.is_contiguous()
    out, lse = run_ours(dataclasses.replace(p, q=q))
    ref_out, ref_lse = mla_decode_reference(p.q, p.k_cache, p.block_table, p.cache_seqlens, causal=True)
    compare(out, lse, ref_out, ref_lse, dtype)


def test_cache_pages_strided_as_in_a_cross_layer_layout():
    # vLLM's cross-layer (and padded-page) KV layouts give each layer's cache a page stride larger than
    # a page: here every page of this layer sits between NaN pages of another.
    b, s_q, h_q, dtype = 6, 2, 16, torch.bfloat16
    p = make_problem(b, s_q, h_q, [0, 1, 700, 64, 4097, 300], dtype, True, 12)
    layers = torch.full((p.k_cache.shape[0], 2, *p.k_cache.shape[1:]), float("nan"), dtype=dtype, device="cuda")
    k_cache = layers[:, 1]
    k_cache.copy_(p.k_cache)
    assert k_cache.stride(0) == 2 * p.k_cache.stride(0)
    out, lse = run_ours(dataclasses.replace(p, k_cache=k_cache))
    ref_out, ref_lse = mla_decode_reference(p.q, p.k_cache, p.block_table, p.cache_seqlens, causal=True)
    compare(out, lse, ref_out, ref_lse, dtype)


# The two parts are read in place when h_q tiles the 64-row block (any token and head strides, vLLM's
# token-major latent rows with s_q > 1 too) or their (s_q, h_q) rows are uniformly strided, and copied
# first otherwise (h_q = 20 with s_q > 1); either way the result is bit for bit the one of the same q
# as one 576-wide tensor.
@pytest.mark.parametrize("b,s_q,h_q,seqlens", [(6, 1, 16, "mixed"), (3, 1, 128, "normal:3000"), (5, 2, 16, "mixed"),
                                               (4, 2, 1, "normal:500"), (2, 4, 128, "4096"), (5, 2, 64, "mixed"),
                                               (3, 8, 8, "mixed"), (3, 3, 32, "normal:700"), (4, 2, 20, "mixed"),
                                               (2, 1, 20, "normal:900")])
def test_q_as_two_parts_matches_the_joined_q(b, s_q, h_q, seqlens):
    p = make_problem(b, s_q, h_q, seqlens_for(seqlens, b, torch.Generator().manual_seed(5)), torch.bfloat16,
                     s_q > 1, 5)
    joined_out, joined_lse = run_ours(p)
    # vLLM's two views, with NaN in the projection's columns that the kernel must not read.
    parts = bench_decode.query_parts(*bench_decode.vllm_query_views(p.q, fill=float("nan")), b, s_q)
    assert not parts[1].is_contiguous() and (h_q == 1 or not parts[0].is_contiguous())  # one head: [1, T, 512]
    out, lse = run_ours(dataclasses.replace(p, q=parts))
    assert torch.equal(out, joined_out) and torch.equal(lse, joined_lse)
    ref_out, ref_lse = mla_decode_reference(p.q, p.k_cache, p.block_table, p.cache_seqlens, causal=p.causal)
    compare(out, lse, ref_out, ref_lse, torch.bfloat16)


def test_cuda_graph_replay_with_changing_seqlens():
    b, s_q, h_q, dtype = 32, 2, 16, torch.bfloat16
    gen = torch.Generator().manual_seed(5)
    p = make_problem(b, s_q, h_q, [3000] * b, dtype, True, 5)
    seqlens = p.cache_seqlens.clone()
    out_buf = torch.empty(b, s_q, h_q, 512, dtype=dtype, device="cuda")
    static = {}

    def step():
        meta, splits = get_mla_metadata(seqlens, s_q * h_q, 1)
        _, static["lse"] = flash_mla_with_kvcache(p.q, p.k_cache, p.block_table, seqlens, 512, meta, splits,
                                                  causal=True, out=out_buf)

    step()  # warm up (extension load, smem attribute) outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    keys = p.k_cache.clone()
    for trial in range(3):
        lens = torch.randint(0, 3001, (b,), generator=gen, dtype=torch.int32)
        lens[trial] = 0  # a padded request
        seqlens.copy_(lens)
        # The keys past each new length are poisoned as make_problem poisons those past the built ones.
        p.k_cache.copy_(keys)
        for i, n in enumerate(lens.tolist()):
            pages = p.block_table[i, : -(-3000 // 64)].long()  # the request's pages as built
            tokens = p.k_cache[pages].view(-1, D_QK)
            tokens[n:] = float("nan")
            p.k_cache[pages] = tokens.view(len(pages), *p.k_cache.shape[1:])
        graph.replay()
        ref_out, ref_lse = mla_decode_reference(p.q, p.k_cache, p.block_table, seqlens, causal=True)
        compare(out_buf, static["lse"], ref_out, ref_lse, dtype)


def test_seqlens_beyond_block_table_rejected():
    p = make_problem(2, 1, 16, [64, 64], torch.bfloat16, False, 0)
    bad = torch.tensor([64, 64 * p.block_table.shape[1] + 1], dtype=torch.int32, device="cuda")
    meta, splits = get_mla_metadata(bad, 16, 1)
    with pytest.raises(ValueError, match="block_table has"):
        flash_mla_with_kvcache(p.q, p.k_cache, p.block_table, bad, 512, meta, splits)


def test_metadata_for_other_head_count_rejected():
    p = make_problem(2, 1, 128, [64, 64], torch.bfloat16, False, 0)
    meta, splits = get_mla_metadata(p.cache_seqlens, 16, 1)
    with pytest.raises(ValueError, match="different num_q_tokens_per_head_k"):
        flash_mla_with_kvcache(p.q, p.k_cache, p.block_table, p.cache_seqlens, 512, meta, splits)


@pytest.mark.parametrize("num_q_rows", [0, 2**31])
def test_op_rejects_query_rows_outside_int32(num_q_rows):
    # The op's own guard for direct torch.ops callers; get_mla_metadata validates before reaching it.
    seqlens = torch.tensor([64, 64], dtype=torch.int32, device="cuda")
    records = torch.empty(132, SCHED_RECORD_INTS, dtype=torch.int32, device="cuda")
    splits = torch.empty(3, dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match=rf"num_q_rows \(s_q \* h_q\) must be a positive int32, got {num_q_rows}"):
        ops().get_mla_metadata(seqlens, 132, num_q_rows, records, splits)


def test_op_rejects_misaligned_records():
    # The scheduler stores records as 16-byte words; a contiguous view 4 bytes into a buffer is refused.
    seqlens = torch.tensor([64, 64], dtype=torch.int32, device="cuda")
    records = torch.empty(132 * SCHED_RECORD_INTS + 1, dtype=torch.int32, device="cuda")[1:].view(132, SCHED_RECORD_INTS)
    splits = torch.empty(3, dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match="records must be 16-byte aligned"):
        ops().get_mla_metadata(seqlens, 132, 16, records, splits)


def test_op_rejects_batch_beyond_shared_memory():
    # The scheduler plans in shared memory, a record per part and an int32 per request: the largest batch
    # that fits one block's opt-in limit is planned, one request more is refused with that limit named.
    parts, int32_bytes = 132, 4
    record_bytes = SCHED_RECORD_INTS * int32_bytes
    most = (torch.cuda.get_device_properties(0).shared_memory_per_block_optin - parts * record_bytes) // int32_bytes
    records = torch.empty(parts, SCHED_RECORD_INTS, dtype=torch.int32, device="cuda")
    seqlens = torch.full((most + 1,), 64, dtype=torch.int32, device="cuda")
    splits = torch.empty(most + 2, dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match=rf"fits at most {most} requests with num_sm_parts = {parts} .* got b = {most + 1}"):
        ops().get_mla_metadata(seqlens, parts, 16, records, splits)
    ops().get_mla_metadata(seqlens[:most], parts, 16, records, splits[: most + 1])
    plan = plan_splits([64] * most, parts, 16)
    assert [SchedRecord.from_ints(r) for r in records.cpu().tolist()] == plan.records
    assert splits[: most + 1].cpu().tolist() == plan.num_splits


def _direct_decode(q, q_rope, workspace_device="cuda"):
    """torch.ops.flashmla_kernels.decode as the Python API would call it for a 2-request, 16-head problem,
    with the partials' workspace (o_accum, lse_accum) on `workspace_device`."""
    b, s_q, h_q = 2, 1, 16
    p = make_problem(b, s_q, h_q, [64] * b, torch.bfloat16, False, 0)
    meta, splits = get_mla_metadata(p.cache_seqlens, s_q * h_q, 1)
    slots = b + meta.shape[0]  # as the Python API sizes the partials
    out = torch.empty(b, s_q, h_q, D_V, dtype=torch.bfloat16, device="cuda")
    lse = torch.empty(b, h_q, s_q, dtype=torch.float32, device="cuda")
    o_accum = torch.empty(slots, s_q * h_q, D_V, dtype=torch.float32, device=workspace_device)
    lse_accum = torch.empty(slots, s_q * h_q, dtype=torch.float32, device=workspace_device)
    ops().decode(q, q_rope, p.k_cache, p.block_table, p.cache_seqlens, meta, splits, D_QK**-0.5, False, out, lse,
                 o_accum, lse_accum)
    return out


_LATENT = dict(size=(2, 1, 16, D_V), dtype=torch.bfloat16, device="cuda")
_ROPE = dict(size=(2, 1, 16, D_ROPE), dtype=torch.bfloat16, device="cuda")


@pytest.mark.parametrize(
    "q, q_rope, pattern",
    [
        (dict(_LATENT), dict(_ROPE, dtype=torch.float16), "q_rope must have q's dtype and device"),
        (dict(_LATENT), dict(_ROPE, device="cpu"), "q_rope must have q's dtype and device"),
        (dict(_LATENT), dict(_ROPE, size=(2, 1, 8, D_ROPE)), r"q_rope must be \[b, s_q, h_q, 64\] with q's b, s_q and h_q"),
        (dict(_LATENT), dict(_ROPE, size=(2, 1, 16, D_QK)), r"q_rope must be \[b, s_q, h_q, 64\]"),
        (dict(_LATENT, size=(2, 1, 16, D_QK)), dict(_ROPE), r"q must be \[b, s_q, h_q, 512\] .* when q_rope is given"),
    ],
    ids=["rope-dtype", "rope-device", "rope-heads", "rope-width", "q-width-with-rope"],
)
def test_op_rejects_bad_q_rope(q, q_rope, pattern):
    # The op's own checks of a two-part q, for direct torch.ops callers (the Python API rejects these first).
    make = lambda spec: torch.randn(*spec["size"], dtype=spec["dtype"], device=spec["device"])  # noqa: E731
    with pytest.raises(RuntimeError, match=pattern):
        _direct_decode(make(q), make(q_rope))


def test_op_rejects_workspace_off_the_device():
    # The kernels write the partials through raw pointers: a host tensor must be refused, not written to.
    q = torch.randn(2, 1, 16, D_QK, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(RuntimeError, match=r"o_accum/lse_accum must be on cuda:0, got cpu"):
        _direct_decode(q, None, workspace_device="cpu")


def test_op_accepts_good_q_rope():
    # The control for test_op_rejects_bad_q_rope: the same call with matching parts runs and writes out.
    torch.manual_seed(0)
    q = torch.randn(2, 1, 16, D_QK, dtype=torch.bfloat16, device="cuda")
    out = _direct_decode(q[..., :D_V], q[..., D_V:])
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()


def bench_case(b, s_q, h_q, seqlen_kind, dtype=torch.bfloat16, causal=None, reps=50):
    """(max error vs reference on the first requests, µs per graph replay, GB/s, TFLOPS)."""
    causal = s_q > 1 if causal is None else causal
    gen = torch.Generator().manual_seed(0)
    seqlens = seqlens_for(seqlen_kind, b, gen)
    p = make_problem(b, s_q, h_q, seqlens, dtype, causal, 0)
    stats = compare(*run_ours(p), *mla_decode_reference(p.q, p.k_cache, p.block_table, p.cache_seqlens, causal=causal), dtype)
    meta, splits = get_mla_metadata(p.cache_seqlens, s_q * h_q, 1)
    out = torch.empty(b, s_q, h_q, 512, dtype=dtype, device="cuda")
    run = lambda: flash_mla_with_kvcache(p.q, p.k_cache, p.block_table, p.cache_seqlens, 512, meta, splits,  # noqa: E731
                                         causal=causal, out=out, check_seqlens=False)
    run()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    us = start.elapsed_time(end) * 1e3 / reps
    total_k = sum(seqlens)
    nbytes = (total_k * 576 + b * s_q * h_q * (576 + 512)) * 2
    flops = 2 * s_q * h_q * total_k * (576 + 512)
    return stats, us, nbytes / us / 1e3, flops / us / 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small", action="store_true", help="small correctness grid (for compute-sanitizer)")
    args = parser.parse_args()
    if args.small:
        for b, s_q, h_q, kind, causal in [(3, 2, 20, "mixed", True), (2, 1, 128, "130", False), (4, 1, 16, "mixed", False)]:
            print(f"b={b} s_q={s_q} h_q={h_q} seqlens={kind} causal={causal}: {check_case(b, s_q, h_q, kind, torch.bfloat16, causal)}")
        # q from vLLM's two views: read in place (boxes of one token, then of four tokens), and copied first
        for b, s_q, h_q in [(3, 1, 128), (3, 2, 16), (2, 2, 20)]:
            test_q_as_two_parts_matches_the_joined_q(b, s_q, h_q, "mixed")
            print(f"b={b} s_q={s_q} h_q={h_q} seqlens=mixed, q as (latent, rope) views: bit-identical to the joined q")
        return
    shapes = itertools.chain(
        ((128, s_q, h, s_k) for s_k in ("4096", "8192") for h in (16, 32, 64, 128) for s_q in (1, 2)),
        ((128, 1, h, "normal:8192") for h in (16, 128)),
        ((b, 1, h, "8192") for b in (1, 16) for h in (16, 128)),
    )
    print(f"{'b':>4} {'s_q':>3} {'h_q':>4} {'seqlens':>12} {'rel_err':>8} {'us':>9} {'GB/s':>7} {'TFLOPS':>7}")
    for b, s_q, h_q, kind in shapes:
        stats, us, gbps, tflops = bench_case(b, s_q, h_q, kind)
        print(f"{b:>4} {s_q:>3} {h_q:>4} {kind:>12} {stats['rel_err']:8.1e} {us:9.1f} {gbps:7.0f} {tflops:7.1f}")


if __name__ == "__main__":
    main()
