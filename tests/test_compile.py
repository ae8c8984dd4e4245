"""The public API under torch.compile(fullgraph=True): both calls trace into one graph with no break, the
ops' schemas and fake kernels pass torch.library.opcheck, and the compiled step gives what the eager one
gives.

On the CPU the extension's ops get stand-in CPU kernels for the length of a test (the scheduler's Python
model and the reference attention) and the tensors pretend to live on a 132-SM Hopper GPU, so what is
checked is the tracing of vllm_flashmla's own code and the ops' registrations. The GPU tests at the end
compile the real kernels."""

from __future__ import annotations

import contextlib
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from mla_cases import make_problem  # noqa: E402

from vllm_flashmla import interface  # noqa: E402
from vllm_flashmla._layout import D_QK, D_V, SCHED_RECORD_INTS  # noqa: E402
from vllm_flashmla.reference import mla_decode_reference  # noqa: E402
from vllm_flashmla.scheduler import num_sm_parts_for, plan_splits  # noqa: E402

NUM_SMS = 132


def _extension_ops():
    try:
        return interface.ops()
    except ImportError as exc:
        pytest.skip(f"the extension is not built: {exc}")


@contextlib.contextmanager
def cpu_kernels_registered(monkeypatch):
    """CPU kernels for the extension's ops while the context is open, and a pretend Hopper GPU."""
    _extension_ops()
    lib = torch.library.Library("flashmla_kernels", "IMPL")

    def get_mla_metadata(cache_seqlens, num_sm_parts, num_q_rows, records, num_splits):
        plan = plan_splits(cache_seqlens.tolist(), num_sm_parts, num_q_rows)
        records.copy_(torch.tensor([r.to_ints() for r in plan.records], dtype=torch.int32))
        num_splits.copy_(torch.tensor(plan.num_splits, dtype=torch.int32))

    def decode(q, q_rope, k_cache, block_table, cache_seqlens, records, num_splits, softmax_scale, causal, out, lse,
               o_accum, lse_accum):
        full_q = q if q_rope is None else torch.cat([q, q_rope], dim=-1)
        ref_out, ref_lse = mla_decode_reference(full_q, k_cache, block_table, cache_seqlens, D_V, softmax_scale, causal)
        out.copy_(ref_out)
        lse.copy_(ref_lse)

    lib.impl("get_mla_metadata", get_mla_metadata, "CPU")
    lib.impl("decode", decode, "CPU")
    torch._dynamo.reset()
    try:
        with monkeypatch.context() as patch:
            patch.setattr(interface, "_require_hopper", lambda name, t: NUM_SMS)
            yield
    finally:
        torch._dynamo.reset()
        lib._destroy()


@pytest.fixture
def cpu_kernels(monkeypatch):
    with cpu_kernels_registered(monkeypatch):
        yield


def make_batch(seqlens, device="cpu"):
    """(q, k_cache, block_table, cache_seqlens) of a causal s_q = 2, 16-head batch, poisoned as the GPU tests'."""
    p = make_problem(len(seqlens), 2, 16, seqlens, torch.bfloat16, True, 0, device)
    return [p.q, p.k_cache, p.block_table, p.cache_seqlens]


def decode_step(q, k_cache, block_table, cache_seqlens):
    """One decode step as a model would write it: the metadata, then the attention."""
    s_q, h_q = q.shape[1], q.shape[2]
    meta, splits = interface.get_mla_metadata(cache_seqlens, s_q * h_q, 1)
    return interface.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, D_V, meta, splits, causal=True)


def split_q_step(q, k_cache, block_table, cache_seqlens, out):
    """The same with q as vLLM's two parts and a preallocated out."""
    s_q, h_q = q.shape[1], q.shape[2]
    meta, splits = interface.get_mla_metadata(cache_seqlens, s_q * h_q, 1)
    parts = (q[..., :D_V], q[..., D_V:])
    return interface.flash_mla_with_kvcache(parts, k_cache, block_table, cache_seqlens, D_V, meta, splits,
                                           causal=True, out=out)


def graph_count(fn, *args):
    explanation = torch._dynamo.explain(fn)(*args)
    return explanation.graph_count, explanation.graph_break_count


def test_a_decode_step_traces_into_one_graph(cpu_kernels):
    batch = make_batch([70, 300, 1])
    assert graph_count(decode_step, *batch) == (1, 0)


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_compiled_step_matches_the_eager_one(cpu_kernels, backend):
    batch = make_batch([70, 300, 1, 128])
    out, lse = decode_step(*batch)
    c_out, c_lse = torch.compile(decode_step, fullgraph=True, backend=backend)(*batch)
    torch.testing.assert_close(c_out, out, rtol=0, atol=0)
    torch.testing.assert_close(c_lse, lse, rtol=0, atol=0)


def test_compiled_step_with_split_q_and_preallocated_out(cpu_kernels):
    q, k_cache, block_table, cache_seqlens = make_batch([5, 640])
    out = torch.empty(*q.shape[:3], D_V, dtype=q.dtype)
    ref_out, ref_lse = split_q_step(q, k_cache, block_table, cache_seqlens, torch.empty_like(out))
    c_out, c_lse = torch.compile(split_q_step, fullgraph=True, backend="aot_eager")(q, k_cache, block_table,
                                                                                   cache_seqlens, out)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)  # written in place
    torch.testing.assert_close(c_lse, ref_lse, rtol=0, atol=0)


def test_compiled_step_follows_a_new_batch_size(cpu_kernels):
    compiled = torch.compile(decode_step, fullgraph=True, backend="aot_eager")
    for seqlens in ([70, 300, 1], [64] * 5, [1000]):
        batch = make_batch(seqlens)
        out, lse = decode_step(*batch)
        c_out, c_lse = compiled(*batch)
        torch.testing.assert_close(c_out, out, rtol=0, atol=0)
        torch.testing.assert_close(c_lse, lse, rtol=0, atol=0)


def opcheck_args(batch):
    q, k_cache, block_table, cache_seqlens = batch
    b, s_q, h_q, _ = q.shape
    rows = s_q * h_q
    num_sm_parts = num_sm_parts_for(NUM_SMS, rows)
    records = torch.zeros(num_sm_parts, SCHED_RECORD_INTS, dtype=torch.int32, device=q.device)
    num_splits = torch.zeros(b + 1, dtype=torch.int32, device=q.device)
    ops = interface.ops()
    ops.get_mla_metadata(cache_seqlens, num_sm_parts, rows, records, num_splits)
    slots = b + num_sm_parts
    decode_args = (q, None, k_cache, block_table, cache_seqlens, records, num_splits, D_QK**-0.5, True,
                   torch.empty(b, s_q, h_q, D_V, dtype=q.dtype, device=q.device),
                   torch.empty(b, h_q, s_q, dtype=torch.float32, device=q.device),
                   torch.empty(slots, rows, D_V, dtype=torch.float32, device=q.device),
                   torch.empty(slots, rows, dtype=torch.float32, device=q.device))
    meta_args = (cache_seqlens, num_sm_parts, rows, torch.empty_like(records), torch.empty_like(num_splits))
    return meta_args, decode_args


# test_autograd_registration is left out: it raises when no input requires grad, and these ops have no
# autograd formula (decode is inference only). test_aot_dispatch_dynamic compares return values, and the
# ops return nothing: that the in-place results survive compilation is what the equal-to-eager tests check.
OPCHECK_TESTS = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")


def opcheck_ops(batch):
    meta_args, decode_args = opcheck_args(batch)
    ops = interface.ops()
    torch.library.opcheck(ops.get_mla_metadata, meta_args, test_utils=OPCHECK_TESTS)
    torch.library.opcheck(ops.decode, decode_args, test_utils=OPCHECK_TESTS)


def test_ops_pass_opcheck(cpu_kernels):
    opcheck_ops(make_batch([70, 300, 1]))


def test_cpu_kernels_are_gone_after_the_test(monkeypatch):
    """The stand-ins must not outlive their test: elsewhere a CPU tensor must not reach a kernel."""
    with cpu_kernels_registered(monkeypatch):
        meta_args, _ = opcheck_args(make_batch([70]))
        interface.ops().get_mla_metadata(*meta_args)
    with pytest.raises(NotImplementedError, match="CPU"):
        interface.ops().get_mla_metadata(*meta_args)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_step_on_the_gpu_matches_eager(backend):
    _extension_ops()
    batch = make_batch([70, 3000, 1, 128, 8192], device="cuda")
    out, lse = decode_step(*batch)
    torch._dynamo.reset()
    interface._DEVICE_FACTS.clear()  # the first trace reads the device's properties itself
    compiled = torch.compile(decode_step, fullgraph=True, backend=backend)
    c_out, c_lse = compiled(*batch)
    torch.testing.assert_close(c_out, out, rtol=0, atol=0)
    torch.testing.assert_close(c_lse, lse, rtol=0, atol=0)
    assert graph_count(decode_step, *batch) == (1, 0)


@pytest.mark.gpu
def test_ops_pass_opcheck_on_the_gpu():
    _extension_ops()
    opcheck_ops(make_batch([70, 3000, 1], device="cuda"))


def test_a_stale_extension_fails_the_first_use_not_the_import(monkeypatch):
    """vLLM imports every candidate backend's module when it picks one; a build from other sources must
    not break that, only the use of these kernels."""
    from vllm_flashmla import _layout, _ops

    _extension_ops()

    def stale(layout_info):
        raise RuntimeError("flashmla_kernels was built from sources whose scheduler layout or constants differ")

    monkeypatch.setattr(_ops, "_OPS", None)
    monkeypatch.setattr(_layout, "check_against_extension", stale)
    _ops.try_load()
    with pytest.raises(RuntimeError, match="built from sources whose scheduler layout"):
        _ops.ops()

