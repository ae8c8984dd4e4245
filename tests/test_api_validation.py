"""Every bad input to the public API raises a TypeError/ValueError/RuntimeError that names the argument,
what was expected and what was given. Runs on the CPU: the GPU-only parts (device facts, the op
itself) are replaced by stand-ins that record what reached them."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vllm_flashmla import interface

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_decode  # noqa: E402  (vLLM's q layout, shared with the benchmark)

B, S_Q, H_Q, MAX_PAGES, NUM_PAGES = 2, 1, 16, 4, 8


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend the tensors live on a 132-SM Hopper GPU, and capture the op calls."""
    calls = []

    class FakeOps:
        def get_mla_metadata(self, *args):
            calls.append(("get_mla_metadata", args))

        def decode(self, *args):
            calls.append(("decode", args))

    monkeypatch.setattr(interface, "_require_hopper", lambda name, t: 132)
    monkeypatch.setattr(interface, "ops", lambda: FakeOps())
    return calls


def args(**overrides):
    a = dict(
        q=torch.randn(B, S_Q, H_Q, 576, dtype=torch.bfloat16),
        k_cache=torch.randn(NUM_PAGES, 64, 1, 576, dtype=torch.bfloat16),
        block_table=torch.zeros(B, MAX_PAGES, dtype=torch.int32),
        cache_seqlens=torch.tensor([10, 200], dtype=torch.int32),
        head_dim_v=512,
        tile_scheduler_metadata=torch.zeros(132, 8, dtype=torch.int32),
        num_splits=torch.zeros(B + 1, dtype=torch.int32),
    )
    a.update(overrides)
    return a


def call(**overrides):
    a = args(**overrides)
    extra = {k: a.pop(k) for k in ("softmax_scale", "causal", "out") if k in a}
    return interface.flash_mla_with_kvcache(*a.values(), **extra)


def test_valid_call_reaches_the_op(fake_gpu):
    out, lse = call()
    assert out.shape == (B, S_Q, H_Q, 512) and out.dtype == torch.bfloat16
    assert lse.shape == (B, H_Q, S_Q) and lse.dtype == torch.float32
    name, op_args = fake_gpu[-1]
    assert name == "decode" and op_args[1] is None and op_args[7] == pytest.approx(576**-0.5)
    o_accum = op_args[11]
    assert o_accum.shape == (B + 132, S_Q * H_Q, 512)


def vllm_q_parts(b=B, s_q=S_Q, h_q=H_Q):
    """q as our backend passes vLLM's two views on: strided views of two buffers."""
    q = torch.randn(b, s_q, h_q, 576, dtype=torch.bfloat16)
    return bench_decode.query_parts(*bench_decode.vllm_query_views(q), b, s_q)


def test_q_as_two_parts_reaches_the_op_in_place(fake_gpu):
    latent, rope = vllm_q_parts()
    out, lse = call(q=(latent, rope))
    assert out.shape == (B, S_Q, H_Q, 512) and lse.shape == (B, H_Q, S_Q)
    name, op_args = fake_gpu[-1]
    assert name == "decode" and op_args[0] is latent and op_args[1] is rope


def test_cache_with_pages_further_apart_reaches_the_op_in_place(fake_gpu):
    # A layer's view of vLLM's cross-layer KV blocks: its pages are two pages apart.
    layers = torch.randn(NUM_PAGES, 2, 64, 1, 576, dtype=torch.bfloat16)
    call(k_cache=layers[:, 1])
    assert fake_gpu[-1][1][2].data_ptr() == layers[:, 1].data_ptr() and fake_gpu[-1][1][2].stride(0) == 2 * 64 * 576


def test_three_dim_cache_is_accepted(fake_gpu):
    call(k_cache=torch.randn(NUM_PAGES, 64, 576, dtype=torch.bfloat16))
    assert fake_gpu[-1][1][2].shape == (NUM_PAGES, 64, 1, 576)


@pytest.mark.parametrize(
    "overrides,exc,pattern",
    [
        (dict(q=[1, 2]), TypeError, "q must be a torch.Tensor, got list"),
        (dict(q=torch.randn(B, S_Q, H_Q, 576)), TypeError, "q must be bfloat16 or float16, got float32"),
        (dict(q=torch.randn(B, H_Q, 576, dtype=torch.bfloat16)), ValueError, r"q must be 4-D \[b, s_q, h_q, d_qk\]"),
        (dict(q=torch.randn(B, S_Q, H_Q, 512, dtype=torch.bfloat16)), ValueError, "must be 576, got 512; pass the two parts"),
        (dict(q=torch.randn(B, S_Q, 0, 576, dtype=torch.bfloat16)), ValueError, r"at least one query token and one head .*\(2, 1, 0, 576\)"),
        (dict(q=torch.randn(B, 0, H_Q, 576, dtype=torch.bfloat16)), ValueError, r"at least one query token and one head .*\(2, 0, 16, 576\)"),
        (dict(q=(torch.randn(B, S_Q, H_Q, 512, dtype=torch.bfloat16),)), TypeError, "q given as a tuple must be .*got a tuple of 1"),
        (dict(q=(torch.randn(B, S_Q, H_Q, 512, dtype=torch.bfloat16), None)), TypeError, r"q\[1\] \(rope\) must be a torch.Tensor"),
        (dict(q=vllm_q_parts()[::-1]), ValueError, r"q\[0\] \(latent\) must have a head dim of 512, got 64"),
        (dict(q=(vllm_q_parts()[0], vllm_q_parts()[1].half())), TypeError, r"q\[1\] \(rope\) dtype must match q\[0\]"),
        (dict(q=(vllm_q_parts()[0], vllm_q_parts(h_q=8)[1])), ValueError, r"q\[1\] \(rope\) must be \[b, s_q, h_q, 64\] = \(2, 1, 16, 64\), got \(2, 1, 8, 64\)"),
        (dict(q=(vllm_q_parts()[0], torch.randn(B, S_Q, H_Q, 128, dtype=torch.bfloat16)[..., ::2])), ValueError, r"q\[1\] \(rope\)'s last dim must be contiguous"),
        (dict(q=(vllm_q_parts()[0], torch.randn(B * S_Q * H_Q * 64 + 4, dtype=torch.bfloat16)[4:].view(B, S_Q, H_Q, 64))), ValueError, r"q\[1\] \(rope\)'s rows must be 16-byte aligned"),
        (dict(q=torch.randn(B, S_Q, 576, H_Q, dtype=torch.bfloat16).transpose(2, 3)), ValueError, "last dim must be contiguous"),
        (dict(head_dim_v=128), ValueError, "head_dim_v must be 512 .*got 128"),
        (dict(k_cache=torch.randn(NUM_PAGES, 64, 1, 576, dtype=torch.float16)), TypeError, "k_cache dtype must match q"),
        (dict(k_cache=torch.randn(NUM_PAGES, 16, 1, 576, dtype=torch.bfloat16)), ValueError, "page size .* must be 64, got 16"),
        (dict(k_cache=torch.randn(NUM_PAGES, 64, 2, 576, dtype=torch.bfloat16)), ValueError, "h_kv = 1 .* got 2"),
        (dict(k_cache=torch.randn(NUM_PAGES, 64, 1, 512, dtype=torch.bfloat16)), ValueError, "head dim must be 576, got 512"),
        (dict(k_cache=torch.randn(NUM_PAGES, 64, 1, 1152, dtype=torch.bfloat16)[..., ::2]), ValueError, "contiguous last dim"),
        (dict(k_cache=torch.randn(0, 64, 1, 576, dtype=torch.bfloat16)), ValueError, r"at least one page, got shape \(0, 64, 1, 576\)"),
        (dict(block_table=torch.zeros(B, MAX_PAGES, dtype=torch.int64)), TypeError, "block_table must be int32, got int64"),
        (dict(block_table=torch.zeros(B + 1, MAX_PAGES, dtype=torch.int32)), ValueError, r"block_table must be \[b=2, max_pages\]"),
        (dict(cache_seqlens=torch.tensor([1, 2], dtype=torch.int64)), TypeError, "cache_seqlens must be int32"),
        (dict(cache_seqlens=torch.tensor([1, 2, 3], dtype=torch.int32)), ValueError, r"cache_seqlens must be \[b=2\]"),
        (dict(cache_seqlens=torch.tensor([1, 4 * 64 + 1], dtype=torch.int32)), ValueError, "257 tokens but block_table has 4 pages"),
        (dict(cache_seqlens=torch.tensor([-1, 4], dtype=torch.int32)), ValueError, "cache_seqlens must be >= 0"),
        (dict(num_splits=torch.zeros(B, dtype=torch.int32)), ValueError, r"num_splits must be \[b \+ 1 = 3\]"),
        (dict(tile_scheduler_metadata=torch.zeros(66, 8, dtype=torch.int32)), ValueError, "computed for a different num_q_tokens_per_head_k"),
        (dict(tile_scheduler_metadata=torch.zeros(132, 8, dtype=torch.int64)), TypeError, "tile_scheduler_metadata must be int32"),
        # The kernels read these three through their data pointers as dense arrays.
        (dict(cache_seqlens=torch.tensor([[10, 99999], [200, 99999]], dtype=torch.int32)[:, 0]), ValueError,
         r"cache_seqlens must be contiguous, got strides \(2,\)"),
        (dict(num_splits=torch.zeros(B + 1, 2, dtype=torch.int32)[:, 1]), ValueError, "num_splits must be contiguous"),
        (dict(tile_scheduler_metadata=torch.zeros(8, 132, dtype=torch.int32).t()), ValueError,
         "tile_scheduler_metadata must be contiguous"),
        (dict(softmax_scale=-1.0), ValueError, "softmax_scale must be a positive finite float"),
        (dict(softmax_scale=float("nan")), ValueError, "softmax_scale must be a positive finite float"),
        (dict(out=torch.empty(B, S_Q, H_Q, 512)), ValueError, "out must be a contiguous"),
        (dict(out=torch.empty(B * S_Q * H_Q * 512 + 1, dtype=torch.bfloat16)[1:].view(B, S_Q, H_Q, 512)), ValueError,
         "out must start at a 16-byte aligned address"),
        (dict(block_table=torch.zeros(B, MAX_PAGES, dtype=torch.int32, device="meta")), ValueError, "block_table must be on q's device cpu, got meta"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_message(fake_gpu, overrides, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call(**overrides)
    assert not fake_gpu, "the op must not run on invalid input"


def test_cpu_tensors_are_rejected_without_a_gpu():
    with pytest.raises(ValueError, match="q must be on a CUDA device .* got device 'cpu'"):
        call()


def test_non_hopper_gpu_is_rejected():
    with pytest.raises(RuntimeError, match=r"requires an sm90a .* found sm_80 \(NVIDIA A100\)"):
        interface.check_capability((8, 0), "NVIDIA A100")
    with pytest.raises(RuntimeError, match="found sm_100"):
        interface.check_capability((10, 0), "NVIDIA B200")
    interface.check_capability((9, 0), "NVIDIA H100")


@pytest.mark.parametrize(
    "call_args,exc,pattern",
    [
        ((torch.tensor([1], dtype=torch.int64), 16, 1), TypeError, "cache_seqlens must be int32"),
        ((torch.tensor([[1]], dtype=torch.int32), 16, 1), ValueError, r"cache_seqlens must be 1-D \[b\]"),
        ((torch.tensor([1], dtype=torch.int32), 16, 2), ValueError, "num_heads_k must be 1"),
        ((torch.tensor([1], dtype=torch.int32), 0, 1), ValueError, "num_q_tokens_per_head_k .* positive int, got 0"),
        ((torch.tensor([1], dtype=torch.int32), True, 1), ValueError, "num_q_tokens_per_head_k .* positive int, got True"),
        ((torch.tensor([1], dtype=torch.int32), 16.0, 1), ValueError, "num_q_tokens_per_head_k .* positive int, got 16.0"),
    ],
)
def test_metadata_bad_input(fake_gpu, call_args, exc, pattern):
    with pytest.raises(exc, match=pattern):
        interface.get_mla_metadata(*call_args)


@pytest.mark.parametrize(
    "seqlens,pattern",
    [([100, -447, 5000], "cache_seqlens must be >= 0, got a minimum of -447"),
     ([2**31 - 1], "more 64-token pages than the scheduler counts in int32"),
     ([2**31 - 65] * 65, "more 64-token pages than the scheduler counts in int32")],
    ids=["negative", "longest", "total"],
)
def test_metadata_refuses_seqlens_it_cannot_plan(fake_gpu, seqlens, pattern):
    # The scheduler plans in shared memory from int32 page counts: such seqlens would write past it.
    with pytest.raises(ValueError, match=pattern):
        interface.get_mla_metadata(torch.tensor(seqlens, dtype=torch.int32), 16, 1)
    assert not fake_gpu, "the op must not run on seqlens it cannot plan"
    interface.get_mla_metadata(torch.tensor(seqlens, dtype=torch.int32), 16, 1, check_seqlens=False)
    assert fake_gpu[-1][0] == "get_mla_metadata", "check_seqlens=False leaves the values to the caller"


def test_metadata_takes_integer_scalars(fake_gpu):
    # s_q * h_q often comes out of numpy or torch arithmetic: any integer scalar is a row count.
    for rows in (np.int64(256), torch.tensor(256)):
        interface.get_mla_metadata(torch.tensor([5, 0, 700], dtype=torch.int32), rows, 1)
        assert fake_gpu[-1][1][1:3] == (33, 256) and type(fake_gpu[-1][1][2]) is int


def test_metadata_of_an_empty_batch(fake_gpu):
    # The op returns before its kernel for b = 0; num_splits is still a valid prefix sum.
    _, splits = interface.get_mla_metadata(torch.zeros(0, dtype=torch.int32), 16, 1)
    assert splits.tolist() == [0]


def test_metadata_shapes(fake_gpu):
    meta, splits = interface.get_mla_metadata(torch.tensor([5, 0, 700], dtype=torch.int32), 128 * 2, 1)
    assert meta.shape == (33, 8) and splits.shape == (4,)
    assert fake_gpu[-1][0] == "get_mla_metadata" and fake_gpu[-1][1][1] == 33
    assert fake_gpu[-1][1][2] == 256, "the scheduler gets the query rows of its piece cost model"
