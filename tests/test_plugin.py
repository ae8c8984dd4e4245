"""CPU tests of the vLLM plugin, the FLASHMLA backend's declarations and its metadata/decode
plumbing, and the embedded tiny model. No GPU and no CUDA extension needed: the functions of
vllm_flashmla.backend that reach the GPU (_get_mla_metadata, _flash_mla_decode, _num_sms) are
replaced by recording fakes.
"""

import importlib.metadata
import itertools
import json
import logging
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from vllm.config import (
    CacheConfig,
    DeviceConfig,
    ModelConfig,
    ParallelConfig,
    SpeculativeConfig,
    VllmConfig,
    set_current_vllm_config,
)
from vllm.config.compilation import CUDAGraphMode
from vllm.model_executor.layers.attention.mla_attention import QueryLenSupport
from vllm.platforms.interface import DeviceCapability
from vllm.v1.attention.backend import AttentionCGSupport, CommonAttentionMetadata
from vllm.v1.attention.backends.registry import AttentionBackendEnum
from vllm.v1.kv_cache_interface import MLAAttentionSpec
from vllm.v1.worker.block_table import BlockTable
from vllm.v1.worker.utils import select_common_block_size

import vllm_flashmla
from vllm_flashmla import backend, plugin
from vllm_flashmla.backend import FlashMLABackend, FlashMLAImpl, FlashMLAMetadataBuilder
from vllm_flashmla.models import LATENT_NORM_GAIN, TINY_MODEL_DIR, save_random_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]
OUR_PATH = "vllm_flashmla.backend.FlashMLABackend"
H_Q = 16  # attention heads of the tiny model
LAYER = "model.layers.0.self_attn.attn"


@pytest.fixture(autouse=True)
def _fresh_registry(monkeypatch):
    monkeypatch.delenv("VLLM_FLASHMLA_DISABLE", raising=False)
    AttentionBackendEnum.FLASHMLA.clear_override()
    yield
    AttentionBackendEnum.FLASHMLA.clear_override()


# --- plugin ---------------------------------------------------------------------------------


def test_entry_point_is_discoverable_by_vllm():
    try:
        importlib.metadata.distribution("vllm-flashmla")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(
            "the vllm-flashmla distribution is not installed (tests run from a source tree); "
            "`pip install --no-build-isolation -e .` installs its entry point"
        )
    from vllm.plugins import DEFAULT_PLUGINS_GROUP, load_plugins_by_group

    ours = [
        ep
        for ep in importlib.metadata.entry_points(group=DEFAULT_PLUGINS_GROUP)
        if ep.name == "flashmla"
    ]
    assert [ep.value for ep in ours] == ["vllm_flashmla.plugin:register"]
    assert load_plugins_by_group(DEFAULT_PLUGINS_GROUP)["flashmla"] is plugin.register


def test_register_points_flashmla_at_our_backend():
    plugin.register()
    assert AttentionBackendEnum.FLASHMLA.get_path() == OUR_PATH
    assert AttentionBackendEnum.FLASHMLA.get_class() is FlashMLABackend


def test_register_is_idempotent_and_logs_one_line():
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    level = plugin.logger.level
    plugin.logger.setLevel(logging.INFO)  # whatever VLLM_LOGGING_LEVEL says
    plugin.logger.addHandler(handler)
    try:
        for _ in range(3):
            plugin.register()
    finally:
        plugin.logger.removeHandler(handler)
        plugin.logger.setLevel(level)
    assert AttentionBackendEnum.FLASHMLA.get_class() is FlashMLABackend
    assert len(records) == 1
    line = records[0].getMessage()
    assert vllm_flashmla.__version__ in line and OUR_PATH in line


@pytest.mark.parametrize("value", ["1", "true", "TRUE"])
def test_disable_env_var_keeps_vllms_backend(monkeypatch, value):
    monkeypatch.setenv("VLLM_FLASHMLA_DISABLE", value)
    plugin.register()
    assert not AttentionBackendEnum.FLASHMLA.is_overridden()
    assert AttentionBackendEnum.FLASHMLA.get_path() == AttentionBackendEnum.FLASHMLA.value


def test_disable_env_var_zero_registers(monkeypatch):
    monkeypatch.setenv("VLLM_FLASHMLA_DISABLE", "0")
    plugin.register()
    assert AttentionBackendEnum.FLASHMLA.get_path() == OUR_PATH


def test_register_imports_neither_backend_nor_kernels():
    # register() runs in every vLLM process, the CPU-only API server included.
    code = (
        "import sys; from vllm_flashmla.plugin import register; register(); "
        "print([m for m in ('vllm_flashmla.backend', 'vllm_flashmla.interface', "
        "'flashmla_kernels') if m in sys.modules])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**_subprocess_env(), "VLLM_FLASHMLA_DISABLE": "0"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


# --- capability declarations ------------------------------------------------------------------


def test_declared_capabilities():
    assert FlashMLABackend.get_name() == "FLASHMLA"
    assert FlashMLABackend.is_mla() and not FlashMLABackend.is_sparse()
    assert FlashMLABackend.supported_dtypes == [torch.float16, torch.bfloat16]
    assert FlashMLABackend.supports_dtype(torch.bfloat16)
    assert FlashMLABackend.supports_dtype(torch.float16)
    assert not FlashMLABackend.supports_dtype(torch.float32)
    assert FlashMLABackend.get_supported_kernel_block_sizes() == [64]
    assert FlashMLABackend.get_supported_head_sizes() == [576]
    assert FlashMLABackend.get_builder_cls() is FlashMLAMetadataBuilder
    assert FlashMLABackend.get_impl_cls() is FlashMLAImpl
    assert FlashMLABackend.get_kv_cache_shape(10, 64, 1, 576) == (10, 64, 576)
    assert FlashMLAMetadataBuilder._cudagraph_support == AttentionCGSupport.UNIFORM_BATCH
    assert FlashMLAMetadataBuilder.query_len_support == QueryLenSupport.UNIFORM
    assert FlashMLAImpl.can_return_lse_for_decode and FlashMLAImpl.lse_base_on_e


@pytest.mark.parametrize(
    "major,minor,ok",
    [(9, 0, True), (8, 0, False), (8, 9, False), (10, 0, False), (12, 0, False)],
)
def test_compute_capability(major, minor, ok):
    assert FlashMLABackend.supports_compute_capability(DeviceCapability(major, minor)) is ok


def test_kv_pages_are_read_by_the_block_stride():
    # vLLM's cross-layer KV blocks and padded pages need the backend to read pages by the block stride,
    # as the kernel does (tests/test_flash_mla.py::test_cache_pages_strided_as_in_a_cross_layer_layout).
    assert FlashMLABackend.get_kv_cache_stride_order() == (0, 1, 2)
    assert FlashMLABackend.get_kv_cache_stride_order(include_num_layers_dimension=True) == (1, 0, 2, 3)
    assert FlashMLABackend.indexes_kv_by_block_stride()


@pytest.mark.parametrize("block_size,ok", [(64, True), (128, True), (256, True), (16, False), (32, False), (96, False)])
def test_block_sizes(block_size, ok):
    assert FlashMLABackend.supports_block_size(block_size) is ok


def _reasons(**overrides) -> list[str]:
    """vLLM's validate_configuration for a DeepSeek decode setup, with overrides."""
    args = dict(
        head_size=576,
        dtype=torch.bfloat16,
        kv_cache_dtype="auto",
        block_size=64,
        use_mla=True,
        has_sink=False,
        use_sparse=False,
        use_mm_prefix=False,
        use_per_head_quant_scales=False,
        device_capability=DeviceCapability(9, 0),
        attn_type="decoder",
    )
    args.update(overrides)
    return FlashMLABackend.validate_configuration(**args)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"block_size": 128},
        {"block_size": 256},
        {"block_size": None},
        {"dtype": torch.float16},
        {"kv_cache_dtype": "bfloat16"},
        {"kv_cache_dtype": "float16", "dtype": torch.float16},
        {"device_capability": DeviceCapability(9, 0)},
    ],
)
def test_valid_configurations(overrides):
    assert _reasons(**overrides) == []


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "fp8_e4m3", "fp8_e5m2", "fp8_ds_mla"])
def test_fp8_kv_cache_rejected_with_reason(kv_cache_dtype):
    reasons = _reasons(kv_cache_dtype=kv_cache_dtype)
    assert "kv_cache_dtype not supported" in reasons
    ours = [r for r in reasons if r.startswith("vllm-flashmla")]
    assert len(ours) == 1 and "bfloat16/float16 KV cache only" in ours[0]
    assert kv_cache_dtype in ours[0]


def test_fp8_warns_that_vllm_picks_another_backend(monkeypatch):
    # vLLM tries FLASHMLA when it picks a backend itself; with an fp8 cache it would have found its own
    # (fp8-capable) FlashMLA there, and now goes on to another, slower one: the log says so, and how to keep it.
    said = []
    monkeypatch.setattr(backend.logger, "warning_once", lambda msg, *args: said.append(msg % args))
    _reasons(kv_cache_dtype="fp8_e4m3")
    assert len(said) == 1 and "fp8_e4m3" in said[0] and "VLLM_FLASHMLA_DISABLE=1" in said[0]
    _reasons(kv_cache_dtype="bfloat16")
    assert len(said) == 1


@pytest.mark.parametrize("block_size", [16, 32, 96])
def test_block_size_reason_names_the_page_size(block_size):
    # vLLM's own reason ("block_size not supported") does not say what would be.
    reasons = _reasons(block_size=block_size)
    ours = [r for r in reasons if r.startswith("vllm-flashmla")]
    assert "block_size not supported" in reasons and len(ours) == 1
    assert "multiple of 64" in ours[0] and f"(got {block_size})" in ours[0]


def test_kv_cache_dtype_must_match_model_dtype():
    [reason] = _reasons(kv_cache_dtype="bfloat16", dtype=torch.float16)
    assert "does not match the model dtype" in reason


@pytest.mark.parametrize(
    "overrides,reason",
    [
        ({"head_size": 320}, "head_size not supported"),
        ({"block_size": 32}, "block_size not supported"),
        ({"dtype": torch.float32}, "dtype not supported"),
        ({"device_capability": DeviceCapability(10, 0)}, "compute capability not supported"),
        ({"device_capability": DeviceCapability(8, 0)}, "compute capability not supported"),
        ({"use_mla": False}, "non-MLA not supported"),
        ({"use_sparse": True}, "sparse not supported"),
    ],
)
def test_invalid_configurations(overrides, reason):
    assert reason in _reasons(**overrides)


@pytest.mark.parametrize("block_size", [64, 128, 256])
def test_vllm_hands_the_kernel_64_token_pages(block_size):
    """We rely on vLLM 0.26 splitting allocation blocks into kernel blocks of
    get_supported_kernel_block_sizes(): block table, KV-cache view and builder spec alike."""
    assert select_common_block_size(block_size, [FlashMLABackend]) == 64
    spec = MLAAttentionSpec(block_size=block_size, num_kv_heads=1, head_size=576, dtype=torch.bfloat16)
    assert spec.copy_with_new_block_size(64).block_size == 64
    table = BlockTable(
        block_size=block_size,
        max_num_reqs=2,
        max_num_blocks_per_req=4,
        max_num_batched_tokens=16,
        pin_memory=False,
        device=torch.device("cpu"),
        kernel_block_size=64,
        cp_kv_cache_interleave_size=1,
    )
    table.add_row([3, 7], 0)
    per_block = block_size // 64
    expected = [blk * per_block + i for blk in (3, 7) for i in range(per_block)]
    assert table.get_numpy_array()[0, : len(expected)].tolist() == expected


# --- metadata builder and decode plumbing ---------------------------------------------------


class FakeKernels:
    """Stands in for the GPU functions of vllm_flashmla.backend and records every call."""

    num_sms = 8
    num_sm_parts = 3

    def __init__(self):
        self.schedules: list[tuple[torch.Tensor, int]] = []
        self.decodes: list[dict] = []

    def get_mla_metadata(self, cache_seqlens, num_q_tokens_per_head_k):
        self.schedules.append((cache_seqlens, num_q_tokens_per_head_k))
        step = len(self.schedules)
        tile = torch.arange(self.num_sm_parts * 8, dtype=torch.int32).view(-1, 8) + 100 * step
        splits = torch.arange(cache_seqlens.shape[0] + 1, dtype=torch.int32) + 1000 * step
        return tile, splits

    def decode(self, q, k_cache, block_table, cache_seqlens, tile, splits, softmax_scale):
        parts = q if isinstance(q, tuple) else (q,)
        self.decodes.append(
            dict(
                q=q,
                q_joined=torch.cat(parts, dim=-1),
                k_cache=k_cache,
                block_table=block_table,
                cache_seqlens=cache_seqlens,
                tile=tile,
                splits=splits,
                softmax_scale=softmax_scale,
            )
        )
        b, s_q, h_q, _ = parts[0].shape
        out = parts[0][..., :512] * 2
        lse = torch.arange(b * h_q * s_q, dtype=torch.float32).view(b, h_q, s_q)
        return out, lse


@pytest.fixture
def kernels(monkeypatch) -> FakeKernels:
    fake = FakeKernels()
    monkeypatch.setattr(backend, "_get_mla_metadata", fake.get_mla_metadata)
    monkeypatch.setattr(backend, "_flash_mla_decode", fake.decode)
    monkeypatch.setattr(backend, "_num_sms", lambda device: fake.num_sms)
    return fake


class _FakePrefillBackend:
    def clone(self):
        return self

    def prepare_metadata(self, metadata):
        pass


def make_vllm_config(
    model_dir: Path = TINY_MODEL_DIR,
    full_cudagraphs: bool = False,
    num_speculative_tokens: int | None = None,
) -> VllmConfig:
    model_config = ModelConfig(model=str(model_dir), dtype="bfloat16", max_model_len=1024)
    speculative_config = None
    if num_speculative_tokens is not None:
        speculative_config = SpeculativeConfig(
            method="ngram",
            num_speculative_tokens=num_speculative_tokens,
            prompt_lookup_min=1,
            prompt_lookup_max=3,
            target_model_config=model_config,
            target_parallel_config=ParallelConfig(),
        )
    config = VllmConfig(
        model_config=model_config,
        cache_config=CacheConfig(block_size=64),
        device_config=DeviceConfig(device="cpu"),
        speculative_config=speculative_config,
    )
    # VllmConfig turns CUDA graphs off on a machine without GPU; the builder only reads the mode.
    config.compilation_config.cudagraph_mode = (
        CUDAGraphMode.FULL_AND_PIECEWISE if full_cudagraphs else CUDAGraphMode.NONE
    )
    # The base builder takes the MLA prefill backend from the first attention layer.
    config.compilation_config.static_forward_context[LAYER] = types.SimpleNamespace(
        prefill_backend=_FakePrefillBackend()
    )
    return config


def make_builder(config: VllmConfig, page_size: int = 64) -> FlashMLAMetadataBuilder:
    spec = MLAAttentionSpec(block_size=page_size, num_kv_heads=1, head_size=576, dtype=torch.bfloat16)
    return FlashMLAMetadataBuilder(spec, [LAYER], config, torch.device("cpu"))


def make_batch(
    query_lens: list[int], seq_lens: list[int], block_table: list[list[int]], num_tokens: int | None = None
) -> CommonAttentionMetadata:
    """A batch as the GPU model runner builds it. For a CUDA-graph padded batch, num_tokens is
    num_reqs * s_q while the padding requests have query length 0 and seq_len 0."""
    query_start_loc = torch.tensor([0, *itertools.accumulate(query_lens)], dtype=torch.int32)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32)
    num_tokens = num_tokens if num_tokens is not None else sum(query_lens)
    return CommonAttentionMetadata(
        query_start_loc=query_start_loc,
        query_start_loc_cpu=query_start_loc.clone(),
        seq_lens=seq_lens_t,
        num_reqs=len(seq_lens),
        num_actual_tokens=num_tokens,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        block_table_tensor=torch.tensor(block_table, dtype=torch.int32),
        slot_mapping=torch.zeros(num_tokens, dtype=torch.int64),
        seq_lens_cpu_upper_bound=seq_lens_t.clone(),
    )


def test_builder_schedules_once_per_step_from_seq_lens(kernels):
    builder = make_builder(make_vllm_config())
    batch = make_batch([1, 1, 1], [130, 64, 1], [[5, 9, 2], [7, 0, 0], [3, 0, 0]])
    meta = builder.build(0, batch)

    assert (meta.num_decodes, meta.num_prefills) == (3, 0)
    [(seq_lens, rows)] = kernels.schedules
    assert seq_lens.data_ptr() == batch.seq_lens.data_ptr() and seq_lens.tolist() == [130, 64, 1]
    assert rows == 1 * H_Q
    decode = meta.decode
    # vLLM's block table is already in 64-token pages: passed through, not copied.
    assert decode.block_table.data_ptr() == batch.block_table_tensor.data_ptr()
    assert decode.seq_lens.data_ptr() == batch.seq_lens.data_ptr()
    assert decode.tile_scheduler_metadata.equal(torch.arange(24, dtype=torch.int32).view(3, 8) + 100)
    assert decode.num_splits.tolist() == [1000, 1001, 1002, 1003]


def test_builder_cuda_graph_padding_requests(kernels):
    """Full CUDA graphs pad the batch with requests of query length 0, seq_len 0 and null
    block-table rows; they are scheduled like any request (the kernel writes zeros)."""
    builder = make_builder(make_vllm_config(full_cudagraphs=True))
    batch = make_batch([1, 1, 0, 0], [100, 65, 0, 0], [[4, 6], [8, 1], [0, 0], [0, 0]], num_tokens=4)
    meta = builder.build_for_cudagraph_capture(batch)

    assert meta.num_decodes == 4 and meta.num_decode_tokens == 4
    [(seq_lens, rows)] = kernels.schedules
    assert seq_lens.tolist() == [100, 65, 0, 0] and rows == H_Q
    assert meta.decode.num_splits.shape == (5,)


def test_builder_reuses_fixed_buffers_under_full_cuda_graphs(kernels):
    builder = make_builder(make_vllm_config(full_cudagraphs=True))
    tile_buf, splits_buf = builder._cg_tile_scheduler_metadata, builder._cg_num_splits
    assert tile_buf.shape == (kernels.num_sms, 8)
    assert splits_buf.shape == (builder.vllm_config.scheduler_config.max_num_seqs + 1,)

    seen = []
    for step, b in enumerate((2, 4), start=1):
        meta = builder.build(0, make_batch([1] * b, [10 * (i + 1) for i in range(b)], [[i] for i in range(b)]))
        seen.append(meta.decode)
        expected_tile = torch.arange(24, dtype=torch.int32).view(3, 8) + 100 * step
        assert meta.decode.tile_scheduler_metadata.equal(expected_tile)
        assert meta.decode.num_splits.tolist() == [1000 * step + i for i in range(b + 1)]
    # Same addresses every step: what a captured graph reads is what this step wrote.
    for decode in seen:
        assert decode.tile_scheduler_metadata.data_ptr() == tile_buf.data_ptr()
        assert decode.num_splits.data_ptr() == splits_buf.data_ptr()


def test_builder_without_full_cuda_graphs_keeps_scheduler_output(kernels):
    builder = make_builder(make_vllm_config(full_cudagraphs=False))
    assert builder._cg_tile_scheduler_metadata is None
    meta = builder.build(0, make_batch([1, 1], [5, 6], [[1], [2]]))
    assert meta.decode.num_splits.tolist() == [1000, 1001, 1002]


def test_builder_spec_decode_uses_uniform_s_q(kernels):
    builder = make_builder(make_vllm_config(full_cudagraphs=True, num_speculative_tokens=3))
    assert builder.reorder_batch_threshold == 4
    meta = builder.build(0, make_batch([4, 4, 0], [40, 9, 0], [[1], [2], [0]], num_tokens=12))
    assert meta.num_decodes == 3 and meta.num_decode_tokens == 12
    [(seq_lens, rows)] = kernels.schedules
    assert seq_lens.tolist() == [40, 9, 0] and rows == 4 * H_Q


def test_builder_schedules_only_the_decode_requests_of_a_mixed_batch(kernels):
    builder = make_builder(make_vllm_config())
    batch = make_batch([1, 1, 30], [10, 70, 30], [[1, 0], [2, 3], [4, 0]])
    meta = builder.build(0, batch)
    assert (meta.num_decodes, meta.num_prefills) == (2, 1)
    [(seq_lens, rows)] = kernels.schedules
    assert seq_lens.tolist() == [10, 70] and rows == H_Q
    assert meta.decode.block_table.tolist() == [[1, 0], [2, 3]]


def test_builder_rejects_pages_other_than_64_tokens(kernels):
    with pytest.raises(ValueError, match="64-token KV pages.*128-token blocks"):
        make_builder(make_vllm_config(), page_size=128)


def test_builder_rejects_more_speculative_tokens_than_the_kernel_decodes(kernels):
    with pytest.raises(ValueError, match="at most 8 query tokens per request.*up to 9 to decode.*parallel drafting"):
        make_builder(make_vllm_config(num_speculative_tokens=8))


def test_builder_rejects_more_heads_than_the_kernel_decodes(kernels, tmp_path):
    model_dir = tmp_path / "wide"
    shutil.copytree(TINY_MODEL_DIR, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config.update(num_attention_heads=256, num_key_value_heads=256)
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="at most 128 query heads.*256"):
        make_builder(make_vllm_config(model_dir))


IMPL_ARGS = dict(
    num_heads=H_Q,
    head_size=576,
    scale=192**-0.5,
    num_kv_heads=1,
    alibi_slopes=None,
    sliding_window=None,
    kv_cache_dtype="auto",
    logits_soft_cap=None,
    attn_type="decoder",
    kv_sharing_target_layer_name=None,
    q_lora_rank=64,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    qk_head_dim=192,
    v_head_dim=128,
    kv_b_proj=None,
)


def make_impl(config: VllmConfig, **overrides) -> FlashMLAImpl:
    with set_current_vllm_config(config):
        return FlashMLAImpl(**{**IMPL_ARGS, **overrides})


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        ({"kv_cache_dtype": "fp8"}, NotImplementedError, "bfloat16/float16 KV cache only.*'fp8'"),
        ({"kv_cache_dtype": "fp8_e5m2"}, NotImplementedError, "bfloat16/float16 KV cache only"),
        ({"sliding_window": 128}, NotImplementedError, "sliding_window"),
        ({"logits_soft_cap": 30.0}, NotImplementedError, "logits_soft_cap"),
        ({"alibi_slopes": [1.0] * H_Q}, NotImplementedError, "alibi_slopes"),
        ({"attn_type": "encoder"}, NotImplementedError, "decoder self-attention only"),
        ({"kv_lora_rank": 256, "head_size": 320}, ValueError, "kv_lora_rank=512.*kv_lora_rank=256"),
    ],
)
def test_impl_rejects_unsupported_configuration(overrides, error, match):
    with pytest.raises(error, match=match):
        make_impl(make_vllm_config(), **overrides)


def _decode_inputs(b: int, s_q: int, num_pages: int = 12):
    """q as MLAAttention hands it to forward_mqa, and a [num_pages, 64, 576] KV cache."""
    gen = torch.Generator().manual_seed(0)
    tokens = b * s_q
    # ql_nope comes out of a head-major bmm, transposed: [T, h_q, 512] with strides (512, T*512, 1).
    ql_nope = torch.randn(H_Q, tokens, 512, generator=gen).transpose(0, 1)
    q_pe = torch.randn(tokens, H_Q, 128 + 64, generator=gen)[..., 128:]  # a slice of q
    kv_cache = torch.randn(num_pages, 64, 576, generator=gen)
    return (ql_nope, q_pe), kv_cache


@pytest.mark.parametrize("s_q", [1, 2])
def test_forward_mqa_calls_the_kernel_with_vllms_tensors(kernels, s_q):
    config = make_vllm_config(num_speculative_tokens=s_q - 1 if s_q > 1 else None)
    builder = make_builder(config)
    impl = make_impl(config)
    b = 3
    meta = builder.build(0, make_batch([s_q] * b, [70, 5, 64], [[1, 2], [3, 0], [4, 0]]))
    q, kv_cache = _decode_inputs(b, s_q)

    out, lse = impl.forward_mqa(q, kv_cache, meta, layer=None)

    [call] = kernels.decodes
    # The two views reach the kernel as they are (reshaped to [b, s_q, h_q, *], no copy).
    latent, rope = call["q"]
    assert latent.shape == (b, s_q, H_Q, 512) and rope.shape == (b, s_q, H_Q, 64)
    assert latent.data_ptr() == q[0].data_ptr() and rope.data_ptr() == q[1].data_ptr()
    expected_q = torch.cat(q, dim=-1).view(b, s_q, H_Q, 576)
    assert call["q_joined"].equal(expected_q)
    assert call["k_cache"].shape == (12, 64, 1, 576)
    assert call["k_cache"].data_ptr() == kv_cache.data_ptr()
    assert call["block_table"] is meta.decode.block_table
    assert call["cache_seqlens"] is meta.decode.seq_lens
    assert call["tile"] is meta.decode.tile_scheduler_metadata
    assert call["splits"] is meta.decode.num_splits
    assert call["softmax_scale"] == impl.scale
    assert out.shape == (b * s_q, H_Q, 512)
    assert out.equal(expected_q[..., :512].reshape(b * s_q, H_Q, 512) * 2)
    assert lse is None


def test_forward_mqa_returns_token_major_lse_for_decode_context_parallel(kernels):
    config = make_vllm_config(num_speculative_tokens=1)
    builder = make_builder(config)
    impl = make_impl(config)
    impl.need_to_return_lse_for_decode = True  # what DCP > 1 sets
    b, s_q = 2, 2
    meta = builder.build(0, make_batch([s_q] * b, [9, 70], [[1, 0], [2, 3]]))
    q, kv_cache = _decode_inputs(b, s_q)

    out, lse = impl.forward_mqa(q, kv_cache, meta, layer=None)

    kernel_lse = torch.arange(b * H_Q * s_q, dtype=torch.float32).view(b, H_Q, s_q)
    assert lse.shape == (b * s_q, H_Q)
    for i, t, h in itertools.product(range(b), range(s_q), range(H_Q)):
        assert lse[i * s_q + t, h] == kernel_lse[i, h, t]


# --- embedded tiny model --------------------------------------------------------------------


def test_tiny_model_is_a_small_deepseek_v3_mla_model():
    config = json.loads((TINY_MODEL_DIR / "config.json").read_text())
    assert config["architectures"] == ["DeepseekV3ForCausalLM"]
    assert (config["kv_lora_rank"], config["qk_rope_head_dim"]) == (512, 64)
    assert (config["qk_nope_head_dim"], config["v_head_dim"]) == (128, 128)
    assert config["num_attention_heads"] == H_Q
    assert 2 <= config["num_hidden_layers"] <= 4
    assert config["first_k_dense_replace"] >= config["num_hidden_layers"]  # all-dense MLP
    size = sum(p.stat().st_size for p in TINY_MODEL_DIR.rglob("*") if p.is_file())
    assert size < 2 * 2**20
    assert not list(TINY_MODEL_DIR.glob("*.safetensors"))  # served with --load-format dummy

    model_config = ModelConfig(model=str(TINY_MODEL_DIR), max_model_len=1024)
    assert model_config.use_mla and model_config.get_head_size() == 576


def test_tiny_model_tokenizer():
    from vllm.tokenizers import get_tokenizer

    tokenizer = get_tokenizer(str(TINY_MODEL_DIR))
    config = json.loads((TINY_MODEL_DIR / "config.json").read_text())
    assert len(tokenizer) == config["vocab_size"]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (config["bos_token_id"], config["eos_token_id"])
    ids = tokenizer("héllo wörld").input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "héllo wörld"
    prompt = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert prompt == "<|begin▁of▁sentence|>Be brief.<|User|>Hi<|Assistant|>"


def test_save_random_checkpoint(tmp_path):
    from safetensors.torch import load_file

    dst = save_random_checkpoint(tmp_path / "ckpt", seed=1)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        assert (dst / name).is_file()
    weights = load_file(dst / "model.safetensors")
    assert all(w.dtype == torch.bfloat16 for w in weights.values())
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= weights.keys()
    assert weights["model.layers.1.self_attn.kv_a_layernorm.weight"].eq(LATENT_NORM_GAIN).all()
    assert weights["model.layers.0.self_attn.q_a_layernorm.weight"].eq(LATENT_NORM_GAIN).all()
    std = weights["model.layers.0.self_attn.kv_b_proj.weight"].float().std().item()
    assert abs(std - 0.02) < 0.002
    again = load_file(save_random_checkpoint(tmp_path / "again", seed=1) / "model.safetensors")
    assert all(weights[k].equal(again[k]) for k in weights)
