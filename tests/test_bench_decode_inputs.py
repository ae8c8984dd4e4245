"""bench_decode.py's inputs on the CPU: q in vLLM's layout, and what each implementation is handed."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_decode  # noqa: E402
from vllm_flashmla._layout import D_QK, D_ROPE, D_V  # noqa: E402

SHAPES = [bench_decode.Shape(4, 1024, 16, 1, False), bench_decode.Shape(3, 200, 8, 2, True)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.label())
def test_q_views_have_vllms_layout_and_q_values(shape):
    inp = bench_decode.make_inputs(shape, 0, "cpu")
    tokens, h_q = shape.b * shape.s_q, shape.h_q
    projected = bench_decode.VLLM_QK_NOPE_HEAD_DIM + D_ROPE
    assert inp.q_nope.shape == (tokens, h_q, D_V) and inp.q_nope.stride() == (D_V, tokens * D_V, 1)
    assert inp.q_pe.shape == (tokens, h_q, D_ROPE) and inp.q_pe.stride() == (h_q * projected, projected, 1)
    assert not inp.q_nope.is_contiguous() and not inp.q_pe.is_contiguous()
    flat = inp.q.reshape(tokens, h_q, D_QK)
    assert torch.equal(inp.q_nope, flat[..., :D_V]) and torch.equal(inp.q_pe, flat[..., D_V:])
    joined = bench_decode.concat_query(inp)
    assert joined.is_contiguous() and torch.equal(joined, inp.q)


class Recorder:
    """Stands in for a kernel entry point: keeps its arguments, returns outputs of the right shapes."""

    def __init__(self, out_shape, lse_shape):
        self.out_shape, self.lse_shape, self.calls = out_shape, lse_shape, []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return torch.zeros(self.out_shape), torch.zeros(self.lse_shape)


def test_flashmla_concatenates_q_inside_the_step_and_ours_and_fa3_take_the_views():
    shape = SHAPES[1]
    inp = bench_decode.make_inputs(shape, 0, "cpu")
    out = torch.empty(shape.b, shape.s_q, shape.h_q, D_V)

    ours = bench_decode.Ours()
    ours.flash_mla_with_kvcache = Recorder(out.shape, (shape.b, shape.h_q, shape.s_q))
    ours.decode(inp, inp.k_cache, (None, None), out)
    latent, rope = ours.flash_mla_with_kvcache.calls[0][0][0]
    assert latent.shape == (shape.b, shape.s_q, shape.h_q, D_V) and rope.shape == (shape.b, shape.s_q, shape.h_q, D_ROPE)
    assert latent.data_ptr() == inp.q_nope.data_ptr() and rope.data_ptr() == inp.q_pe.data_ptr()  # no copy
    assert torch.equal(torch.cat((latent, rope), dim=-1), inp.q)

    flashmla = bench_decode.FlashMLA()
    flashmla.flash_mla_with_kvcache = Recorder(out.shape, (shape.b, shape.h_q, shape.s_q))
    flashmla.decode(inp, inp.k_cache, None, out)
    q = flashmla.flash_mla_with_kvcache.calls[0][1]["q"]
    assert q.is_contiguous() and torch.equal(q, inp.q) and q.data_ptr() != inp.q.data_ptr()  # a copy in the step

    fa3 = bench_decode.FA3MLA(num_splits=32)
    tokens = shape.b * shape.s_q
    fa3.flash_attn_varlen_func = Recorder((tokens, shape.h_q, D_V), (shape.h_q, tokens))
    fa3.decode(inp, inp.k_cache, None, out)
    kwargs = fa3.flash_attn_varlen_func.calls[0][1]
    assert kwargs["q"] is inp.q_pe and kwargs["q_v"] is inp.q_nope
