#!/usr/bin/env python3
"""Decode-step benchmark: our MLA decode kernels vs FlashMLA and FA3-MLA as shipped in vLLM 0.26.0.

All implementations run in one process on identical inputs (same q, paged bf16 KV cache, permuted
block table, seqlens). For each (shape, implementation):

1. The scheduler metadata is computed once, outside the graph, as vLLM's metadata builder does.
2. The output of a CUDA-graph replay is checked against vllm_flashmla.reference on a few requests;
   a bad mismatch turns the row into an error record and the implementation is not timed.
3. One CUDA graph holds `calls` back-to-back decode steps, each everything the implementation's vLLM
   backend runs in forward_mqa from q as vLLM hands it over (two strided views, ql_nope and q_pe):
   ours = decode + combine, FlashMLA = q concat + split-KV + combine, FA3 = forward + combine (ours
   and FA3 read the two views in place). The steps cycle
   over enough KV-cache copies that their total size is >= 4x the L2 cache, so no step reads KV left
   in L2 by the previous one - the situation of consecutive layers in a real model. CUDA events
   around N replays give the time per step; the reported `us` is the median over `--reps` runs.
4. `meta_us` is the extra time per step of a second graph that also computes the metadata inside
   every step (for FlashMLA this is how vLLM 0.26.0 runs it: its scheduler runs lazily inside
   flash_mla_with_kvcache). Both graphs are timed in alternation so clock drift affects both alike.

Results go to a JSON file whose top-level "rows" hold one record per (shape, implementation); the
file is rewritten after every shape so a killed run keeps what it measured. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import importlib.util
import math
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
sys.path.insert(0, BENCH_DIR)
# Prefer an installed vllm_flashmla (pip install -e . puts the built extension next to the package);
# fall back to the source tree so the reference and error messages are still available.
if importlib.util.find_spec("vllm_flashmla") is None:
    sys.path.append(REPO_ROOT)

import make_table  # noqa: E402  (benchmarks/make_table.py: summary and Markdown table, no torch)
from nvml_meter import EnergyWindow, NvmlError, NvmlMeter, PowerReading  # noqa: E402
from results_io import default_results_path, git_state, nvidia_smi, write_json  # noqa: E402
from vllm_flashmla._layout import D_QK, D_ROPE, D_V, PAGE_SIZE  # noqa: E402

SOFTMAX_SCALE = D_QK**-0.5  # passed explicitly: FA3's default would be 1/sqrt(64) of its q_pe
IMPL_NAMES = ("ours", "flashmla", "fa3mla")
# vLLM's FA3-MLA builder passes this as num_splits when full CUDA graphs are on
# (AttentionConfig.flash_attn_max_num_splits_for_cuda_graph in vllm/config/attention.py).
VLLM_FA3_CUDAGRAPH_MAX_SPLITS = 32

# vLLM 0.26.0's DeepSeek MLA decode (MLAAttention.forward in vllm/model_executor/layers/attention/
# mla_attention.py) hands the backend q as two strided views: ql_nope [T, h_q, 512], the transpose of
# the absorbed BMM's [h_q, T, 512] output, and q_pe [T, h_q, 64], the RoPE columns of the projected
# [T, h_q, qk_nope_head_dim + 64] q. Each implementation takes them the way its vLLM backend does.
VLLM_QK_NOPE_HEAD_DIM = 128  # DeepSeek-V2/V3's per-head non-RoPE q width before absorption

MIN_CALLS_PER_GRAPH = 8  # amortises the graph launch; with >= 4x L2 of KV in rotation anyway
L2_ROTATION_FACTOR = 4
MAX_KV_COPIES = 256
CHECK_REQUESTS = 4  # requests per shape compared against the fp32 reference
REL_TOL = 0.05  # max |out - ref| of a request allowed, relative to its max |ref|; real bugs are O(1)
LSE_TOL = 1e-2  # max |lse - ref| allowed (natural log): 1% of the softmax mass; bf16 runs are at ~1e-5
MAX_REPLAYS_PER_REP = 10_000
# --energy: a power window per implementation and shape, after its timing (measure_power).
ENERGY_SECONDS = 1.5  # of NVML counter refreshes (~100 ms apart); default of --energy-s
POWER_SETTLE_S = 0.3  # replays before the window opens, while the power settles
POWER_LEAD_MS = 20.0  # GPU time the host may queue ahead of the GPU
POWER_POLL_S = 0.002  # host time between reads of the counter, at least ...
POWER_POLL_DUTY = 0.1  # ... so that reads take at most this share of the host's time


# --------------------------------------------------------------------------------------------------
# Shapes


@dataclass(frozen=True)
class Shape:
    b: int
    s_k: int
    h_q: int
    s_q: int
    varlen: bool

    def as_dict(self) -> dict:
        return {"b": self.b, "s_k": self.s_k, "h_q": self.h_q, "s_q": self.s_q, "varlen": self.varlen}

    def label(self) -> str:
        return make_table.shape_label(self.as_dict())


def full_grid() -> list[Shape]:
    shapes = [
        Shape(128, s_k, h_q, s_q, varlen)
        for s_k in (4096, 8192, 16384)
        for h_q in (16, 32, 64, 128)
        for s_q in (1, 2)
        for varlen in (False, True)
    ]
    shapes += [Shape(b, s_k, h_q, 1, False) for b in (1, 4, 16, 32) for s_k in (1024, 8192, 32768) for h_q in (16, 128)]
    return shapes


def quick_grid() -> list[Shape]:
    return [
        Shape(128, 8192, 128, 1, False),
        Shape(128, 8192, 128, 2, True),
        Shape(128, 4096, 16, 1, False),
        Shape(128, 16384, 64, 1, True),
        Shape(4, 32768, 128, 1, False),
        Shape(32, 1024, 16, 1, False),
    ]


FILTER_KEYS = {"b": int, "s_k": int, "h_q": int, "s_q": int, "varlen": None}


def parse_shape_filter(text: str) -> dict[str, set]:
    """'b=128,h_q=64|128,varlen=1' -> {'b': {128}, 'h_q': {64, 128}, 'varlen': {True}}."""
    conditions: dict[str, set] = {}
    for term in filter(None, (t.strip() for t in text.split(","))):
        key, sep, values = term.partition("=")
        key = key.strip()
        if not sep or key not in FILTER_KEYS:
            raise argparse.ArgumentTypeError(
                f"bad shape filter term {term!r}: expected KEY=V1|V2 with KEY in {', '.join(FILTER_KEYS)}"
            )
        parsed = set()
        for value in values.split("|"):
            value = value.strip().lower()
            if key == "varlen":
                if value not in ("0", "1", "uniform", "varlen", "false", "true"):
                    raise argparse.ArgumentTypeError(f"varlen takes 0/1/uniform/varlen, got {value!r}")
                parsed.add(value in ("1", "varlen", "true"))
            else:
                try:
                    parsed.add(int(value))
                except ValueError:
                    raise argparse.ArgumentTypeError(f"{key} takes integers, got {value!r}") from None
        conditions[key] = parsed
    return conditions


def select_shapes(shapes: list[Shape], filters: list[dict[str, set]]) -> list[Shape]:
    if not filters:
        return shapes
    return [s for s in shapes if any(all(getattr(s, k) in v for k, v in f.items()) for f in filters)]


# --------------------------------------------------------------------------------------------------
# Inputs


@dataclass
class Inputs:
    shape: Shape
    seqlens_cpu: np.ndarray  # int64 [b]
    q: torch.Tensor  # [b, s_q, h_q, 576] bf16, contiguous: the reference's input
    # The same values as vLLM passes them to the backend (VLLM_QK_NOPE_HEAD_DIM above), T = b * s_q:
    q_nope: torch.Tensor  # [T, h_q, 512], strides (512, T * 512, 1)
    q_pe: torch.Tensor  # [T, h_q, 64], strides (h_q * (128 + 64), 128 + 64, 1)
    k_cache: torch.Tensor  # [num_pages, 64, 1, 576] bf16; V = first 512 columns
    block_table: torch.Tensor  # [b, max_pages] int32, a random permutation of the pages
    seqlens: torch.Tensor  # [b] int32
    cu_seqlens_q: torch.Tensor  # [b + 1] int32, for FA3's varlen interface
    causal: bool
    scale: float = SOFTMAX_SCALE

    @property
    def max_seqlen(self) -> int:
        return int(self.seqlens_cpu.max())

    @property
    def kv_bytes(self) -> int:
        return self.k_cache.numel() * self.k_cache.element_size()


def shape_seed(seed: int, shape: Shape) -> np.random.SeedSequence:
    # h_q is left out so every head count sees the same seqlens and page layout.
    return np.random.SeedSequence([seed, shape.b, shape.s_k, shape.s_q, int(shape.varlen)])


def make_seqlens(shape: Shape, rng: np.random.Generator) -> np.ndarray:
    if not shape.varlen:
        return np.full(shape.b, shape.s_k, dtype=np.int64)
    lens = np.rint(rng.normal(shape.s_k, shape.s_k / 2, shape.b)).astype(np.int64)
    # Lower bound s_q, not 1: the KV of a step always holds its own s_q query tokens, and with causal
    # masking a shorter request would leave query rows with no visible key (undefined in vLLM).
    return np.clip(lens, shape.s_q, 2 * shape.s_k)


def make_inputs(shape: Shape, seed: int, device: torch.device | str) -> Inputs:
    seq = shape_seed(seed, shape)
    rng = np.random.default_rng(seq)
    seqlens = make_seqlens(shape, rng)
    pages_per_req = -(-seqlens // PAGE_SIZE)
    num_pages = int(pages_per_req.sum())
    perm = rng.permutation(num_pages).astype(np.int32)
    block_table = np.zeros((shape.b, int(pages_per_req.max())), dtype=np.int32)
    starts = np.concatenate([[0], np.cumsum(pages_per_req)])
    for i, n in enumerate(pages_per_req):
        block_table[i, :n] = perm[starts[i] : starts[i] + n]

    gen = torch.Generator(device=device)
    gen.manual_seed(int(seq.generate_state(1)[0]))
    q = torch.randn((shape.b, shape.s_q, shape.h_q, D_QK), generator=gen, device=device, dtype=torch.bfloat16)
    k_cache = torch.randn((num_pages, PAGE_SIZE, 1, D_QK), generator=gen, device=device, dtype=torch.bfloat16)
    q_nope, q_pe = vllm_query_views(q)
    return Inputs(
        shape=shape,
        seqlens_cpu=seqlens,
        q=q,
        q_nope=q_nope,
        q_pe=q_pe,
        k_cache=k_cache,
        block_table=torch.from_numpy(block_table).to(device),
        seqlens=torch.from_numpy(seqlens.astype(np.int32)).to(device),
        cu_seqlens_q=torch.arange(0, shape.b + 1, dtype=torch.int32, device=device) * shape.s_q,
        causal=shape.s_q > 1,
    )


def vllm_query_views(q: torch.Tensor, fill: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """q [b, s_q, h_q, 576] laid out as vLLM's MLA decode hands it to a backend: (ql_nope, q_pe). `fill`
    goes into the projection's columns that q_pe leaves out (the GPU tests put NaN there)."""
    b, s_q, h_q, _ = q.shape
    tokens = q.reshape(b * s_q, h_q, D_QK)
    bmm_out = tokens[..., :D_V].transpose(0, 1).contiguous()  # [h_q, T, 512], as torch.bmm writes it
    projected = torch.full((b * s_q, h_q, VLLM_QK_NOPE_HEAD_DIM + D_ROPE), fill, dtype=q.dtype, device=q.device)
    projected[..., VLLM_QK_NOPE_HEAD_DIM:] = tokens[..., D_V:]
    return bmm_out.transpose(0, 1), projected[..., VLLM_QK_NOPE_HEAD_DIM:]


def concat_query(inp: Inputs) -> torch.Tensor:
    """What vLLM's FlashMLA backend does first in forward_mqa: one contiguous [b, s_q, h_q, 576] q from
    the two views (a copy kernel inside every decode step)."""
    s = inp.shape
    return torch.cat((inp.q_nope, inp.q_pe), dim=-1).view(s.b, s.s_q, s.h_q, D_QK)


def query_parts(q_nope: torch.Tensor, q_pe: torch.Tensor, b: int, s_q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What vllm_flashmla/backend.py's forward_mqa passes on: vLLM's two [T, h_q, *] views as
    [b, s_q, h_q, *] views of the same memory, no copy."""
    return q_nope.view(b, s_q, *q_nope.shape[1:]), q_pe.view(b, s_q, *q_pe.shape[1:])


def work(shape: Shape, seqlens: np.ndarray) -> tuple[int, int]:
    """(bytes, flops) with FlashMLA's benchmark formulas; causal masking is not discounted."""
    rows = shape.b * shape.s_q * shape.h_q
    nbytes = (int(seqlens.sum()) * D_QK + rows * D_QK + rows * D_V) * 2
    flops = 2 * shape.s_q * shape.h_q * int(seqlens.sum()) * (D_QK + D_V)
    return nbytes, flops


def check_requests(seqlens: np.ndarray) -> list[int]:
    """A few requests to verify: first, last, longest, shortest (varlen extremes)."""
    idx = [0, len(seqlens) - 1, int(seqlens.argmax()), int(seqlens.argmin())]
    return sorted(set(idx))[:CHECK_REQUESTS]


# --------------------------------------------------------------------------------------------------
# Implementations. prepare() is the per-step metadata call vLLM's builder makes outside the graph;
# decode() is what runs inside the graph. Both return (out [b, s_q, h_q, 512], lse [b, h_q, s_q]).


class Unavailable(Exception):
    pass


class Ours:
    name = "ours"

    def load(self):
        import vllm_flashmla

        self.get_mla_metadata = vllm_flashmla.get_mla_metadata
        self.flash_mla_with_kvcache = vllm_flashmla.flash_mla_with_kvcache
        # The extension loads lazily on the first call: make a missing build or a non-Hopper GPU show
        # up here, once, instead of as an error row per shape.
        self.get_mla_metadata(torch.ones(1, dtype=torch.int32, device="cuda"), 1, 1)

    def prepare(self, inp: Inputs):
        s = inp.shape
        return self.get_mla_metadata(inp.seqlens, s.s_q * s.h_q, 1)

    def decode(self, inp: Inputs, kv: torch.Tensor, meta, out: torch.Tensor):
        tile_scheduler_metadata, num_splits = meta
        return self.flash_mla_with_kvcache(
            query_parts(inp.q_nope, inp.q_pe, inp.shape.b, inp.shape.s_q),  # as our backend: read in place
            kv,
            inp.block_table,
            inp.seqlens,
            D_V,
            tile_scheduler_metadata,
            num_splits,
            softmax_scale=inp.scale,
            causal=inp.causal,
            out=out,
        )


class FlashMLA:
    """vLLM 0.26.0's bundled FlashMLA, called like vllm/v1/attention/backends/mla/flashmla.py (bf16).

    Its get_mla_metadata() only returns an empty FlashMLASchedMeta; the scheduler kernel runs inside
    the first flash_mla_with_kvcache() call that sees it and is reused afterwards. The warm-up call
    made before graph capture therefore computes the metadata outside the graph.
    """

    name = "flashmla"

    def load(self):
        from vllm.v1.attention.ops.flashmla import (
            flash_mla_with_kvcache,
            get_mla_metadata,
            is_flashmla_dense_supported,
        )

        ok, reason = is_flashmla_dense_supported()
        if not ok:
            raise Unavailable(reason)
        self.get_mla_metadata = get_mla_metadata
        self.flash_mla_with_kvcache = flash_mla_with_kvcache

    def prepare(self, inp: Inputs):
        s = inp.shape
        sched_meta, _ = self.get_mla_metadata(inp.seqlens, s.s_q * s.h_q, 1)
        return sched_meta

    def decode(self, inp: Inputs, kv: torch.Tensor, sched_meta, out: torch.Tensor):
        return self.flash_mla_with_kvcache(
            q=concat_query(inp),  # as vLLM's FlashMLAImpl.forward_mqa
            k_cache=kv,
            block_table=inp.block_table,
            cache_seqlens=inp.seqlens,
            head_dim_v=D_V,
            tile_scheduler_metadata=sched_meta,
            num_splits=None,
            softmax_scale=inp.scale,
            causal=inp.causal,
            is_fp8_kvcache=False,
            # FlashMLA writes its internal [b, h_kv, s_q * h_q, d_v] layout, the same memory as ours.
            out=out.view(out.shape[0], 1, -1, out.shape[-1]),
        )


class FA3MLA:
    """vLLM 0.26.0's FA3 with the MLA q_v path, called like vllm/v1/attention/backends/mla/flashattn_mla.py."""

    name = "fa3mla"

    def __init__(self, num_splits: int):
        self.num_splits = num_splits

    def load(self):
        from vllm.vllm_flash_attn import (
            fa_version_unsupported_reason,
            flash_attn_varlen_func,
            get_scheduler_metadata,
            is_fa_version_supported,
        )

        if not is_fa_version_supported(3):
            raise Unavailable(fa_version_unsupported_reason(3))
        self.flash_attn_varlen_func = flash_attn_varlen_func
        self.get_scheduler_metadata = get_scheduler_metadata

    def prepare(self, inp: Inputs):
        s = inp.shape
        return self.get_scheduler_metadata(
            batch_size=s.b,
            max_seqlen_q=s.s_q,
            max_seqlen_k=inp.max_seqlen,
            num_heads_q=s.h_q,
            num_heads_kv=1,
            headdim=D_ROPE,
            cache_seqlens=inp.seqlens,
            qkv_dtype=torch.bfloat16,
            headdim_v=D_V,
            page_size=PAGE_SIZE,
            cu_seqlens_q=inp.cu_seqlens_q,
            causal=inp.causal,
            num_splits=self.num_splits,
        )

    def decode(self, inp: Inputs, kv: torch.Tensor, scheduler_metadata, out: torch.Tensor):
        s = inp.shape
        o, lse = self.flash_attn_varlen_func(  # takes vLLM's two q views as they are, no copy
            q=inp.q_pe,  # against k = the RoPE columns of the cache
            k=kv[..., D_V:],
            v=kv[..., :D_V],  # the latent is both V and the "K" of q_v
            q_v=inp.q_nope,
            max_seqlen_q=s.s_q,
            cu_seqlens_q=inp.cu_seqlens_q,
            max_seqlen_k=inp.max_seqlen,
            seqused_k=inp.seqlens,
            block_table=inp.block_table,
            softmax_scale=inp.scale,
            causal=inp.causal,
            return_softmax_lse=True,
            out=out.view(s.b * s.s_q, s.h_q, D_V),
            fa_version=3,
            scheduler_metadata=scheduler_metadata,
            num_splits=self.num_splits,
        )
        # FA3 returns out [b*s_q, h_q, 512] and lse [h_q, b*s_q] (token index = request * s_q + t).
        return o.view(s.b, s.s_q, s.h_q, D_V), lse.view(s.h_q, s.b, s.s_q).permute(1, 0, 2)


def load_impls(names: list[str], fa3_num_splits: int) -> tuple[dict, dict]:
    """(loaded impls by name, {name: {"available": bool, "reason": str}})."""
    factories = {"ours": Ours, "flashmla": FlashMLA, "fa3mla": lambda: FA3MLA(fa3_num_splits)}
    loaded, status = {}, {}
    for name in names:
        impl = factories[name]()
        try:
            impl.load()
        except Exception as exc:  # ImportError, missing .so, unsupported GPU: record and skip
            status[name] = {"available": False, "reason": f"{type(exc).__name__}: {exc}"}
            continue
        loaded[name] = impl
        status[name] = {"available": True}
    return loaded, status


# --------------------------------------------------------------------------------------------------
# Verification


@dataclass
class Baseline:
    source: str  # "reference", or the implementation whose output stands in for it
    idx: list[int]
    out: torch.Tensor  # [len(idx), s_q, h_q, 512]
    lse: torch.Tensor  # [len(idx), h_q, s_q]


def reference_baseline(inp: Inputs) -> Baseline:
    from vllm_flashmla.reference import mla_decode_reference

    idx = check_requests(inp.seqlens_cpu)
    sel = torch.tensor(idx, device=inp.q.device)
    out, lse = mla_decode_reference(
        inp.q[sel],
        inp.k_cache,
        inp.block_table[sel],
        inp.seqlens[sel],
        head_dim_v=D_V,
        softmax_scale=inp.scale,
        causal=inp.causal,
    )
    return Baseline("reference", idx, out, lse)


def compare(out: torch.Tensor, lse: torch.Tensor, base: Baseline) -> dict:
    """Row fields `err` (max |out - ref|), `lse_err` (max |lse - ref| where ref is finite) and, on a
    bad mismatch, `error`. Each checked request is held to its own scale: in a varlen batch the
    shortest request's output (a few V rows) can be 10x larger than a long one's, and one tolerance
    for all would let a long request attend to half its keys. An LSE of another shape (an
    implementation that does not return it in this layout) only gets a note."""
    sel = torch.tensor(base.idx, device=out.device)
    o, r = out[sel].float(), base.out.float().to(out.device)
    if o.shape != r.shape:
        return {"error": f"output shape {tuple(o.shape)} != {base.source} {tuple(r.shape)}"}
    if not torch.isfinite(o).all():
        return {"error": f"non-finite output (checked vs {base.source})"}
    req_err = (o - r).abs().flatten(1).amax(1)
    req_ref = r.abs().flatten(1).amax(1).clamp_min(1e-6)
    fields = {"err": req_err.max().item()}
    worst = int((req_err / req_ref).argmax())
    if req_err[worst] > REL_TOL * req_ref[worst]:
        fields["error"] = (
            f"output mismatch vs {base.source} in request {base.idx[worst]}: max abs err "
            f"{req_err[worst].item():.3g}, its max |ref| {req_ref[worst].item():.3g}"
        )
    lo, lr = lse[sel].float(), base.lse.float().to(lse.device)
    finite = torch.isfinite(lr)
    if lo.shape != lr.shape:
        fields["note"] = f"lse shape {tuple(lo.shape)} != {base.source} {tuple(lr.shape)}"
    elif not torch.equal(torch.isinf(lo), torch.isinf(lr)):
        fields.setdefault("error", f"lse is infinite where {base.source} is not, or the reverse")
    elif finite.any():
        lse_err = (lo[finite] - lr[finite]).abs().max().item()
        fields["lse_err"] = lse_err
        if not lse_err <= LSE_TOL:  # also NaN
            fields.setdefault("error", f"lse mismatch vs {base.source}: max abs err {lse_err:.3g}")
    return fields


# --------------------------------------------------------------------------------------------------
# Graphs and timing


def capture(step, calls: int):
    """CUDA graph of step(0..calls-1); returns (graph, output of the last step)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(0)  # warm-up outside capture: lazy init, and FlashMLA computes its scheduler here
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            result = step(i)
    return graph, result


def time_graphs(graphs: list, calls: int, reps: int, target_ms: float) -> list[float]:
    """Median microseconds per step of each graph; graphs alternate within every repetition."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    counts = []
    for g in graphs:
        g.replay()
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        counts.append(int(min(MAX_REPLAYS_PER_REP, max(1, round(target_ms / max(start.elapsed_time(end), 1e-3))))))
    samples: list[list[float]] = [[] for _ in graphs]
    for _ in range(reps):
        for g, n, acc in zip(graphs, counts, samples, strict=True):
            start.record()
            for _ in range(n):
                g.replay()
            end.record()
            end.synchronize()
            acc.append(start.elapsed_time(end) * 1e3 / (n * calls))
    return [statistics.median(acc) for acc in samples]


def measure_power(graph, us_per_replay: float, meter: NvmlMeter, seconds: float) -> PowerReading | None:
    """Mean GPU power while `graph` replays back to back: POWER_SETTLE_S to let the power settle, then
    `seconds` of NVML counter refreshes (nvml_meter.EnergyWindow). The host stays at most about
    POWER_LEAD_MS of replays ahead of the GPU, so the queue left at the end is short, and spends at most
    about POWER_POLL_DUTY of its time reading the counter (a read is a driver call: 2.8 ms median on
    an H200 of the pool, up to 18 ms), so it keeps the queue filled between reads even for graphs of
    tens of microseconds."""
    window = EnergyWindow(meter)
    lead = max(2, math.ceil(POWER_LEAD_MS * 1e3 / us_per_replay))
    queued: collections.deque = collections.deque()
    t0 = time.perf_counter()
    next_poll, stop = t0 + POWER_SETTLE_S, t0 + POWER_SETTLE_S + seconds
    while True:
        graph.replay()
        queued.append(torch.cuda.Event())
        queued[-1].record()
        if len(queued) > lead:
            queued.popleft().synchronize()
        t = time.perf_counter()
        if t >= stop:
            break
        if t >= next_poll:
            took = window.poll()
            next_poll = t + max(POWER_POLL_S, took / POWER_POLL_DUTY)
    torch.cuda.synchronize()
    return window.reading()


def bench_impl(
    impl, inp: Inputs, kv_copies: list[torch.Tensor], calls: int, base: Baseline | None, args
) -> tuple[dict, Baseline | None]:
    """Row fields measured for one implementation; the second value is a stand-in baseline made
    from this implementation's output when no reference was available."""
    s = inp.shape
    n = len(kv_copies)
    fields: dict = {}
    out = torch.empty(s.b, s.s_q, s.h_q, D_V, dtype=torch.bfloat16, device=inp.q.device)

    meta = impl.prepare(inp)
    g_dec, (o, lse) = capture(lambda i: impl.decode(inp, kv_copies[i % n], meta, out), calls)
    o.fill_(float("nan"))  # a kernel that skips rows cannot pass the check on stale data
    lse.fill_(float("nan"))
    g_dec.replay()
    torch.cuda.synchronize()
    new_base = None
    if base is None:
        if not torch.isfinite(o).all():
            return {"error": "non-finite output (no reference to compare with)"}, None
        idx = check_requests(inp.seqlens_cpu)
        sel = torch.tensor(idx, device=o.device)
        new_base = Baseline(impl.name, idx, o[sel].clone(), lse[sel].clone())
    else:
        fields.update(compare(o, lse, base))
        if "error" in fields:
            return fields, None

    graphs = [g_dec]
    try:
        g_full, _ = capture(lambda i: impl.decode(inp, kv_copies[i % n], impl.prepare(inp), out), calls)
        graphs.append(g_full)
    except Exception as exc:  # metadata not capturable: still report the decode time
        fields["note"] = f"meta_us unavailable: {type(exc).__name__}: {exc}"
        torch.cuda.synchronize()

    times = time_graphs(graphs, calls, args.reps, args.target_ms)
    fields["us"] = round(times[0], 3)
    fields["meta_us"] = round(times[1] - times[0], 3) if len(times) > 1 else None
    meter = getattr(args, "meter", None)
    if meter is not None:
        power = measure_power(g_dec, times[0] * calls, meter, args.energy_s)
        fields["watts"] = round(power.watts, 1) if power else None
        fields["mj_per_step"] = round(power.watts * times[0] * 1e-3, 4) if power else None
        fields["sm_mhz"] = power.sm_mhz if power else None
    return fields, new_base


def empty_row(shape: Shape, impl: str) -> dict:
    return {
        **shape.as_dict(),
        "impl": impl,
        "us": None,
        "gbps": None,
        "tflops": None,
        "meta_us": None,
        "err": None,
        "lse_err": None,
        "kv_copies": None,
        "error": None,
        "note": None,
    }


def kv_rotation(inp: Inputs, l2_bytes: int) -> tuple[list[torch.Tensor], int]:
    """(KV-cache copies whose total is >= L2_ROTATION_FACTOR x L2, decode steps per graph): a graph's
    steps cycle over the copies, so no step reads KV that the previous one left in L2."""
    n_copies = min(MAX_KV_COPIES, max(1, math.ceil(L2_ROTATION_FACTOR * l2_bytes / inp.kv_bytes)))
    kv_copies = [inp.k_cache] + [inp.k_cache.clone() for _ in range(n_copies - 1)]
    return kv_copies, max(n_copies, MIN_CALLS_PER_GRAPH)


def impl_orders(names: list[str], both_orders: bool) -> list[list[str]]:
    """The passes over one shape: the given order, and with both_orders its reverse too, so that every
    implementation is timed once in a position and once in the mirrored one (the middle one of three
    twice in the middle)."""
    return [list(names), list(reversed(names))] if both_orders else [list(names)]


# Row fields that are the mean of the passes; the check's errors keep the worse pass.
MEAN_FIELDS = ("us", "meta_us", "watts", "mj_per_step", "sm_mhz")
MAX_FIELDS = ("err", "lse_err")


def merge_passes(passes: list[dict]) -> dict:
    """One row from the same implementation's rows of every pass over a shape (impl_orders): a failed
    pass makes the row that pass's; otherwise MEAN_FIELDS are averaged (None if any pass lacks one),
    MAX_FIELDS keep the worse pass, and `us_passes` lists each pass's us in pass order."""
    if len(passes) == 1:
        return passes[0]
    failed = [r for r in passes if r["error"] or r["us"] is None]
    if failed:
        return failed[0]
    row = dict(passes[0])
    for key in MEAN_FIELDS:
        if key in row:
            values = [r.get(key) for r in passes]
            row[key] = None if any(v is None for v in values) else round(statistics.fmean(values), 3)
    for key in MAX_FIELDS:
        values = [r.get(key) for r in passes]
        row[key] = None if any(v is None for v in values) else max(values)
    row["us_passes"] = [r["us"] for r in passes]
    row["note"] = "; ".join(dict.fromkeys(r["note"] for r in passes if r.get("note"))) or None
    return row


def run_shape(shape: Shape, impls: dict, status: dict, names: list[str], args, l2_bytes: int) -> list[dict]:
    inp = make_inputs(shape, args.seed, "cuda")
    nbytes, flops = work(shape, inp.seqlens_cpu)
    kv_copies, calls = kv_rotation(inp, l2_bytes)
    n_copies = len(kv_copies)

    base = None
    ref_note = None
    try:
        base = reference_baseline(inp)
    except Exception as exc:
        ref_note = f"reference unavailable ({type(exc).__name__}: {exc}); checked against the first impl"

    passes: dict[str, list[dict]] = {name: [] for name in names}
    for order in impl_orders(names, args.both_orders):
        for name in order:
            row = empty_row(shape, name)
            row["kv_copies"] = n_copies
            if name not in impls:
                row["error"] = f"unavailable: {status[name]['reason']}"
                passes[name].append(row)
                continue
            try:
                fields, new_base = bench_impl(impls[name], inp, kv_copies, calls, base, args)
            except Exception as exc:
                fields, new_base = {"error": f"{type(exc).__name__}: {exc}"}, None
            row.update(fields)
            if new_base is not None:
                base = new_base
                row["note"] = "; ".join(filter(None, [row["note"], ref_note]))
            passes[name].append(row)
            torch.cuda.empty_cache()  # release this impl's graph pool before the next one captures
            if row["error"] and not cuda_healthy():
                raise CudaContextLost([merge_passes(passes[n]) for n in names if passes[n]], row["error"])
    rows = [merge_passes(passes[name]) for name in names]
    for row in rows:
        if row["us"] is not None:
            row["gbps"] = round(nbytes / (row["us"] * 1e-6) / 1e9, 2)
            row["tflops"] = round(flops / (row["us"] * 1e-6) / 1e12, 2)
    return rows


class CudaContextLost(Exception):
    def __init__(self, rows, message):
        super().__init__(message)
        self.rows = rows


def cuda_healthy() -> bool:
    """False after a sticky error (e.g. an illegal address): nothing else can run in this process."""
    try:
        torch.cuda.synchronize()
        torch.zeros(1, device="cuda").add_(1).item()
        return True
    except Exception:
        return False


# --------------------------------------------------------------------------------------------------
# Environment and output


# nvidia-smi's view of the benchmarked GPU, before and after the grid.
NVSMI_FIELDS = [
    "name",
    "uuid",
    "driver_version",
    "clocks.sm",
    "clocks.mem",
    "clocks.max.sm",
    "clocks.max.mem",
    "clocks.applications.graphics",
    "power.limit",
    "temperature.gpu",
    "persistence_mode",
]


def environment(args, status: dict) -> dict:
    props = torch.cuda.get_device_properties(0)
    uuid = str(getattr(props, "uuid", "")) or None
    versions = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    try:
        import vllm

        versions["vllm"] = vllm.__version__
    except Exception as exc:
        versions["vllm"] = f"unavailable: {exc}"
    spec = importlib.util.find_spec("vllm_flashmla")
    versions["vllm_flashmla_path"] = os.path.dirname(spec.origin) if spec and spec.origin else None
    commit, dirty = git_state()
    return {
        "gpu": props.name,
        "gpu_props": {
            "capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count,
            "l2_bytes": props.L2_cache_size,
            "memory_bytes": props.total_memory,
            "uuid": uuid,
        },
        "clocks": nvidia_smi(NVSMI_FIELDS, uuid),
        "versions": versions,
        "git_commit": commit,
        "git_dirty": dirty,
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "method": {
            "timing": "CUDA graph of `calls` decode steps cycling over `kv_copies` KV-cache copies "
            f"(>= {L2_ROTATION_FACTOR}x L2 in total, at least {MIN_CALLS_PER_GRAPH} steps); "
            "CUDA events around N replays; per-step us = elapsed / (N * calls); median of reps",
            "meta_us": "per-step time of a graph that also computes the scheduler metadata in every step, minus `us`",
            "reps": args.reps,
            "target_ms_per_rep": args.target_ms,
            "seed": args.seed,
            "softmax_scale": SOFTMAX_SCALE,
            "page_size": PAGE_SIZE,
            "fa3_num_splits": args.fa3_num_splits,
            "varlen": "seqlens ~ round(Normal(s_k, s_k/2)) clipped to [s_q, 2*s_k]",
            "check": f"{CHECK_REQUESTS} requests vs vllm_flashmla.reference (fp32), "
            f"fail if max|err| > {REL_TOL} * max|ref|",
            "q": "vLLM 0.26.0's two views, ql_nope [T, h_q, 512] (transposed [h_q, T, 512] BMM output) and "
            f"q_pe [T, h_q, 64] (of a [T, h_q, {VLLM_QK_NOPE_HEAD_DIM + D_ROPE}] projection); flashmla "
            "concatenates them inside every step as its vLLM backend does, ours and fa3mla read them in place",
            "bytes": "(sum(seqlens)*576 + b*s_q*h_q*576 + b*s_q*h_q*512) * 2",
            "flops": "2 * sum(s_q*h_q*seqlen*(576+512))",
            "both_orders": args.both_orders,
            "order": "every shape: "
            + " then ".join(",".join(o) for o in impl_orders(args.impl_names, args.both_orders))
            + ("; us (and meta_us, the power fields) = mean of the two passes, us_passes = each pass's us"
               if args.both_orders else ""),
        },
        "impls": status,
    }


def write_results(path: str, env: dict, rows: list[dict], complete: bool) -> None:
    write_json(path, {**env, "complete": complete, "rows": rows, "summary": make_table.summary_dict(rows)})


def progress_line(i: int, total: int, shape: Shape, rows: list[dict], seconds: float) -> str:
    parts = []
    for r in rows:
        if r["error"]:
            parts.append(f"{r['impl']} {'n/a' if r['error'].startswith('unavailable') else 'ERROR'}")
        else:
            meta = f" (+{r['meta_us']:.1f} meta)" if r["meta_us"] is not None else ""
            parts.append(f"{r['impl']} {r['us']:.1f}us{meta}")
    return f"[{i}/{total}] {shape.label():<32} " + " | ".join(parts) + f"  [{seconds:.1f}s]"


# --------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="a handful of representative shapes instead of the full grid")
    p.add_argument(
        "--impls",
        default=",".join(IMPL_NAMES),
        help=f"comma-separated subset of {','.join(IMPL_NAMES)} (default: all), timed in this order on every shape",
    )
    p.add_argument(
        "--shapes",
        action="append",
        type=parse_shape_filter,
        default=[],
        metavar="FILTER",
        help="keep shapes matching KEY=V1|V2,... with KEY in b,s_k,h_q,s_q,varlen "
        "(e.g. 'b=128,h_q=64|128,varlen=1'); repeat to OR several filters",
    )
    p.add_argument("--out", help="results JSON (default: benchmarks/results/decode_<gpu>_<utc time>.json)")
    p.add_argument("--reps", type=int, default=7, help="timed repetitions per graph; the median is reported")
    p.add_argument("--target-ms", type=float, default=25.0, help="GPU time per repetition (sets the replay count)")
    p.add_argument(
        "--fa3-num-splits",
        type=int,
        default=VLLM_FA3_CUDAGRAPH_MAX_SPLITS,
        help="num_splits for FA3 (vLLM passes 32 under full CUDA graphs; 0 = FA3's heuristic)",
    )
    p.add_argument(
        "--energy",
        action="store_true",
        help="after each implementation's timing, also record the GPU's mean power (watts), energy per step "
        "(mj_per_step) and SM clock (sm_mhz) from NVML over a window of back-to-back replays",
    )
    p.add_argument(
        "--energy-s",
        type=float,
        default=ENERGY_SECONDS,
        help=f"seconds of NVML counter refreshes per power window (default {ENERGY_SECONDS}; at least "
        f"{EnergyWindow.MIN_SECONDS})",
    )
    p.add_argument(
        "--both-orders",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time every shape twice, in the --impls order and then reversed, and report each implementation's "
        "mean (us_passes holds both; default): on a power-limited GPU the implementation timed first on a shape "
        "gains about 1%% (docs/perf-notes.md, round 16). --no-both-orders times the --impls order only, in half "
        "the time",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--list", action="store_true", help="print the selected shapes and exit (no GPU needed)")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.impls.split(",") if n.strip()]
    unknown = [n for n in names if n not in IMPL_NAMES]
    if unknown or not names or len(set(names)) != len(names):
        p.error(f"--impls: got {args.impls!r}; expected distinct names from {','.join(IMPL_NAMES)}")
    # On a power-limited GPU each implementation's timing heats the GPU for the next one, and the order
    # moved single shapes by up to 6% on the H200s (docs/perf-notes.md, round 16), so by default every
    # shape is timed in both orders; the order is recorded with the command either way.
    args.impl_names = names
    if args.reps < 1 or args.target_ms <= 0:
        p.error("--reps must be >= 1 and --target-ms > 0")
    if args.energy_s < EnergyWindow.MIN_SECONDS:
        p.error(f"--energy-s must be >= {EnergyWindow.MIN_SECONDS} (NVML refreshes its energy counter ~every 100 ms)")
    args.shape_list = select_shapes(quick_grid() if args.quick else full_grid(), args.shapes)
    if not args.shape_list:
        p.error("--shapes selected no shape")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        for s in args.shape_list:
            print(s.label())
        print(f"{len(args.shape_list)} shapes x {len(args.impl_names)} impls")
        return 0
    if not torch.cuda.is_available():
        print("bench_decode: no CUDA device; this benchmark needs an sm90 GPU", file=sys.stderr)
        return 1

    impls, status = load_impls(args.impl_names, args.fa3_num_splits)
    for name, st in status.items():
        if not st["available"]:
            print(f"warning: {name} unavailable, recording error rows: {st['reason']}", file=sys.stderr)
    env = environment(args, status)
    args.meter = None
    if args.energy:
        try:
            args.meter = NvmlMeter(env["gpu_props"]["uuid"] or "")
            args.meter.energy_mj()
        except NvmlError as exc:
            print(f"bench_decode: --energy needs NVML's energy counter: {exc}", file=sys.stderr)
            return 1
        env["method"]["energy"] = (
            f"after each implementation's timing, its decode graph replays back to back for {POWER_SETTLE_S} s plus "
            f"a window of {args.energy_s} s; watts: NVML's cumulative energy counter (refreshed ~every 100 ms) "
            "between the first and the last refresh seen in the window, over the host time between them; "
            "mj_per_step: watts x us; sm_mhz: median of NVML's SM clock read at each refresh. Whole-GPU "
            "readings: HBM and idle power included"
        )
    out_path = args.out or default_results_path("decode", env["gpu"])
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    l2_bytes = env["gpu_props"]["l2_bytes"] or 50 * 2**20
    print(
        f"{env['gpu']} | torch {torch.__version__} | CUDA {torch.version.cuda} | vLLM {env['versions']['vllm']}"
        f" | {len(args.shape_list)} shapes | -> {out_path}",
        flush=True,
    )

    rows: list[dict] = []
    t_start = time.monotonic()
    exit_code = 0
    for i, shape in enumerate(args.shape_list, 1):
        t0 = time.monotonic()
        try:
            shape_rows = run_shape(shape, impls, status, args.impl_names, args, l2_bytes)
        except CudaContextLost as exc:
            shape_rows, lost = exc.rows, str(exc)
        except Exception as exc:  # input allocation (e.g. out of memory) or the reference failed
            shape_rows = [{**empty_row(shape, n), "error": f"{type(exc).__name__}: {exc}"} for n in args.impl_names]
            lost = None if cuda_healthy() else shape_rows[0]["error"]
        else:
            lost = None
        rows += shape_rows
        if lost:
            print(f"CUDA context lost at {shape.label()} ({lost}); stopping", file=sys.stderr)
            exit_code = 2
            break
        torch.cuda.empty_cache()
        print(progress_line(i, len(args.shape_list), shape, shape_rows, time.monotonic() - t0), flush=True)
        for r in shape_rows:
            if r["error"] and not r["error"].startswith("unavailable"):
                print(f"    {r['impl']}: {r['error']}", file=sys.stderr, flush=True)
        write_results(out_path, env, rows, complete=False)

    env["clocks_after"] = nvidia_smi(NVSMI_FIELDS, env["gpu_props"]["uuid"])
    env["wall_s"] = round(time.monotonic() - t_start, 1)
    write_results(out_path, env, rows, complete=exit_code == 0)
    if any(r["impl"] == "ours" and r["error"] and not r["error"].startswith("unavailable") for r in rows):
        exit_code = exit_code or 1
    print(f"\nwrote {out_path} ({env['wall_s']} s)\n")
    print(make_table.markdown(rows, header=None))
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
