"""vLLM attention backend running MLA decode on the vllm_flashmla Hopper kernels.

Only the weight-absorbed decode step (``forward_mqa``: every query head attends to the
single latent KV head) runs on our kernels. Prefill and chunked-context prefill stay on
vLLM's MLA prefill path inherited from ``MLACommonImpl``.

KV pages: vLLM 0.26 already splits its allocation blocks into kernel blocks of one of the
sizes from ``get_supported_kernel_block_sizes()`` (``vllm.v1.worker.utils.
select_common_block_size`` and ``BlockTable.map_to_kernel_blocks``): with ``--block-size
128`` or ``256`` each allocation block becomes 2 or 4 consecutive 64-token pages, in the
block table, the slot mapping and the KV-cache tensor alike. The builder therefore always
sees 64-token pages and only checks that (``_check_page_size``); nothing here translates.

The functions that reach the GPU, ``_get_mla_metadata``, ``_flash_mla_decode`` and
``_num_sms``, are module-level so that CPU tests can replace them. The CUDA extension itself
loads on the first kernel call.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch

from vllm.config import VllmConfig
from vllm.config.cache import CacheDType
from vllm.logger import init_logger
from vllm.model_executor.layers.attention.mla_attention import (
    MLACommonBackend,
    MLACommonDecodeMetadata,
    MLACommonImpl,
    MLACommonMetadata,
    MLACommonMetadataBuilder,
    QueryLenSupport,
)
from vllm.platforms.interface import DeviceCapability
from vllm.utils.platform_utils import num_compute_units
from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE
from vllm.v1.attention.backend import (
    AttentionCGSupport,
    AttentionLayer,
    AttentionType,
    MultipleOf,
)
from vllm.v1.attention.backends.utils import (
    reshape_attn_output_for_spec_decode,
    reshape_query_for_spec_decode,
)
from vllm.v1.kv_cache_interface import AttentionSpec

from vllm_flashmla import flash_mla_with_kvcache, get_mla_metadata
from vllm_flashmla._layout import D_QK, D_ROPE, D_V, MAX_H_Q, MAX_S_Q, PAGE_SIZE, SCHED_RECORD_INTS

_KV_CACHE_DTYPE_REASON = (
    "vllm-flashmla decodes a bfloat16/float16 KV cache only; use kv_cache_dtype "
    "auto, bfloat16 or float16 (got {kv_cache_dtype!r}), or set VLLM_FLASHMLA_DISABLE=1 "
    "to leave FLASHMLA on vLLM's own FlashMLA, which reads fp8 KV caches"
)
# When vLLM picks the backend itself, it tries FLASHMLA after FLASH_ATTN_MLA on Hopper; neither takes
# an fp8 KV cache once FLASHMLA is ours, so vLLM moves on to a slower MLA backend without saying why.
_FP8_AUTO_SELECTION_WARNING = (
    "vllm-flashmla replaces vLLM's FLASHMLA attention backend and does not read %s KV caches, so "
    "vLLM chooses another MLA backend for this model instead of its own FlashMLA; set "
    "VLLM_FLASHMLA_DISABLE=1 to keep vLLM's FlashMLA for fp8 KV caches"
)
logger = init_logger(f"vllm.{__name__}")


def _num_sms(device: torch.device) -> int:
    return num_compute_units(device.index)


def _get_mla_metadata(
    cache_seqlens: torch.Tensor, num_q_tokens_per_head_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    # vLLM's seq_lens are valid: no host sync for checking them.
    return get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, 1, check_seqlens=False)


def _flash_mla_decode(
    q: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    tile_scheduler_metadata: torch.Tensor,
    num_splits: torch.Tensor,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    # causal: with s_q > 1 (speculative tokens) query i of a request must not see the
    # keys of queries i+1..s_q-1, which are already in the cache.
    # check_seqlens=False: the check reads cache_seqlens on the host, a sync in every
    # layer; vLLM's block tables always cover seq_lens.
    return flash_mla_with_kvcache(
        q,
        k_cache,
        block_table,
        cache_seqlens,
        D_V,
        tile_scheduler_metadata,
        num_splits,
        softmax_scale=softmax_scale,
        causal=True,
        check_seqlens=False,
    )


def _check_page_size(page_size: int) -> None:
    if page_size != PAGE_SIZE:
        raise ValueError(
            f"vllm-flashmla reads {PAGE_SIZE}-token KV pages but vLLM handed the "
            f"FLASHMLA metadata builder {page_size}-token blocks; use a --block-size "
            f"that is a multiple of {PAGE_SIZE}"
        )


class FlashMLABackend(MLACommonBackend):
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16]
    supported_kv_cache_dtypes: ClassVar[list[CacheDType]] = [
        "auto",
        "bfloat16",
        "float16",
    ]

    @staticmethod
    def get_name() -> str:
        return "FLASHMLA"

    @staticmethod
    def get_builder_cls() -> type["FlashMLAMetadataBuilder"]:
        return FlashMLAMetadataBuilder

    @staticmethod
    def get_impl_cls() -> type["FlashMLAImpl"]:
        return FlashMLAImpl

    @staticmethod
    def get_supported_kernel_block_sizes() -> list[int | MultipleOf]:
        return [PAGE_SIZE]

    @staticmethod
    def get_kv_cache_stride_order(
        include_num_layers_dimension: bool = False,
    ) -> tuple[int, ...]:
        # The kernel reads pages through k_cache.stride(0) (its TMA map of the cache), so the block
        # dim may be outermost with other layers' pages, or padding, between a layer's pages: vLLM
        # then allows cross-layer KV blocks (KV connectors) and padded pages, as for its other MLA
        # backends.
        return (1, 0, 2, 3) if include_num_layers_dimension else (0, 1, 2)

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return [D_QK]

    @classmethod
    def supports_compute_capability(cls, capability: DeviceCapability) -> bool:
        # The kernels use sm90a instructions (wgmma, TMA); they run on Hopper only.
        return capability.major == 9

    @classmethod
    def supports_combination(
        cls,
        head_size: int,
        dtype: torch.dtype,
        kv_cache_dtype: CacheDType | None,
        block_size: int | None,
        use_mla: bool,
        has_sink: bool,
        use_sparse: bool,
        use_mm_prefix: bool,
        device_capability: DeviceCapability,
    ) -> str | None:
        if block_size is not None and block_size % PAGE_SIZE != 0:
            return (
                f"vllm-flashmla reads {PAGE_SIZE}-token KV pages; use a --block-size that is "
                f"a multiple of {PAGE_SIZE} (got {block_size})"
            )
        if kv_cache_dtype is None or kv_cache_dtype == "auto":
            return None
        if kv_cache_dtype not in cls.supported_kv_cache_dtypes:
            if kv_cache_dtype.startswith("fp8"):
                logger.warning_once(_FP8_AUTO_SELECTION_WARNING, kv_cache_dtype)
            return _KV_CACHE_DTYPE_REASON.format(kv_cache_dtype=kv_cache_dtype)
        if STR_DTYPE_TO_TORCH_DTYPE[kv_cache_dtype] != dtype:
            return (
                f"vllm-flashmla reads q and the KV cache in one dtype; "
                f"kv_cache_dtype={kv_cache_dtype!r} does not match the model dtype {dtype}"
            )
        return None


@dataclass
class FlashMLADecodeMetadata(MLACommonDecodeMetadata):
    tile_scheduler_metadata: torch.Tensor  # int32 [num_sm_parts, SCHED_RECORD_INTS]
    num_splits: torch.Tensor  # int32 [b + 1]


@dataclass
class FlashMLAMetadata(MLACommonMetadata[FlashMLADecodeMetadata]):
    pass


class FlashMLAMetadataBuilder(MLACommonMetadataBuilder[FlashMLAMetadata]):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_BATCH
    # Speculative decoding: the base class raises reorder_batch_threshold to
    # 1 + num_speculative_tokens, and requests of that uniform query length decode here.
    query_len_support: ClassVar[QueryLenSupport] = QueryLenSupport.UNIFORM

    def __init__(
        self,
        kv_cache_spec: AttentionSpec,
        layer_names: list[str],
        vllm_config: VllmConfig,
        device: torch.device,
    ):
        super().__init__(
            kv_cache_spec, layer_names, vllm_config, device, FlashMLAMetadata
        )
        _check_page_size(kv_cache_spec.block_size)
        if self.reorder_batch_threshold > MAX_S_Q:
            raise ValueError(
                f"vllm-flashmla decodes at most {MAX_S_Q} query tokens per request, but "
                f"this configuration sends up to {self.reorder_batch_threshold} to decode "
                f"(1 + num_speculative_tokens, or 1 + 2 * num_speculative_tokens with "
                f"parallel drafting); lower num_speculative_tokens"
            )
        # Decode context parallelism all-gathers q over the DCP ranks along the head dim.
        self.h_q = self.num_heads * self.dcp_world_size
        if self.h_q > MAX_H_Q:
            raise ValueError(
                f"vllm-flashmla decodes at most {MAX_H_Q} query heads per GPU, but this "
                f"configuration has {self.h_q}; raise tensor parallelism"
            )

        # Full CUDA graphs replay the kernels with the tensor addresses seen at capture,
        # so every step's scheduler output is copied into these fixed buffers.
        self._cg_tile_scheduler_metadata: torch.Tensor | None = None
        self._cg_num_splits: torch.Tensor | None = None
        if self.compilation_config.cudagraph_mode.has_full_cudagraphs():
            # num_sm_parts never exceeds the SM count.
            self._cg_tile_scheduler_metadata = torch.empty(
                (_num_sms(device), SCHED_RECORD_INTS), dtype=torch.int32, device=device
            )
            self._cg_num_splits = torch.empty(
                vllm_config.scheduler_config.max_num_seqs + 1,
                dtype=torch.int32,
                device=device,
            )

    def _build_decode(
        self,
        block_table_tensor: torch.Tensor,
        seq_lens_device: torch.Tensor,
        max_seq_len: int,
        query_start_loc_cpu: torch.Tensor,
        query_start_loc_device: torch.Tensor,
        num_decode_tokens: int,
        dcp_tot_seq_lens_device: torch.Tensor | None,
    ) -> FlashMLADecodeMetadata:
        # Decode query lengths are uniform except for CUDA-graph padding requests, which
        # have query length 0 and seq_len 0 (the kernels write out = 0 for them).
        s_q = int((query_start_loc_cpu[1:] - query_start_loc_cpu[:-1]).max())
        tile_scheduler_metadata, num_splits = _get_mla_metadata(
            seq_lens_device, s_q * self.h_q
        )
        if self._cg_tile_scheduler_metadata is not None:
            tile_scheduler_metadata = _copy_into(
                self._cg_tile_scheduler_metadata, tile_scheduler_metadata
            )
            num_splits = _copy_into(self._cg_num_splits, num_splits)
        return FlashMLADecodeMetadata(
            block_table=block_table_tensor,
            seq_lens=seq_lens_device,
            dcp_tot_seq_lens=dcp_tot_seq_lens_device,
            tile_scheduler_metadata=tile_scheduler_metadata,
            num_splits=num_splits,
        )


def _copy_into(buffer: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    n = src.shape[0]
    if n > buffer.shape[0]:
        raise RuntimeError(
            f"scheduler metadata has {n} rows but its CUDA-graph buffer holds "
            f"{buffer.shape[0]}"
        )
    dst = buffer[:n]
    dst.copy_(src)
    return dst


class FlashMLAImpl(MLACommonImpl[FlashMLAMetadata]):
    can_return_lse_for_decode: bool = True

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: list[float] | None,
        sliding_window: int | None,
        kv_cache_dtype: str,
        logits_soft_cap: float | None,
        attn_type: str,
        kv_sharing_target_layer_name: str | None,
        **mla_args,
    ) -> None:
        super().__init__(
            num_heads,
            head_size,
            scale,
            num_kv_heads,
            alibi_slopes,
            sliding_window,
            kv_cache_dtype,
            logits_soft_cap,
            attn_type,
            kv_sharing_target_layer_name,
            **mla_args,
        )
        unsupported = [
            name
            for name, value in (
                ("alibi_slopes", alibi_slopes),
                ("sliding_window", sliding_window),
                ("logits_soft_cap", logits_soft_cap),
            )
            if value is not None
        ]
        if unsupported:
            raise NotImplementedError(
                f"vllm-flashmla does not support {', '.join(unsupported)}"
            )
        if attn_type != AttentionType.DECODER:
            raise NotImplementedError(
                f"vllm-flashmla supports decoder self-attention only, not {attn_type}"
            )
        if kv_cache_dtype not in FlashMLABackend.supported_kv_cache_dtypes:
            raise NotImplementedError(
                _KV_CACHE_DTYPE_REASON.format(kv_cache_dtype=kv_cache_dtype)
            )
        if self.kv_lora_rank != D_V or self.qk_rope_head_dim != D_ROPE:
            raise ValueError(
                f"vllm-flashmla needs kv_lora_rank={D_V} and qk_rope_head_dim={D_ROPE} "
                f"(DeepSeek-V2/V3 MLA); this model has kv_lora_rank={self.kv_lora_rank} "
                f"and qk_rope_head_dim={self.qk_rope_head_dim}"
            )

    def forward_mqa(
        self,
        q: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        kv_c_and_k_pe_cache: torch.Tensor,
        attn_metadata: FlashMLAMetadata,
        layer: AttentionLayer,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        decode = attn_metadata.decode
        assert decode is not None
        if isinstance(q, tuple):
            # (q_nope absorbed into the latent [T, h_q, 512], q_pe [T, h_q, 64]): strided
            # views of two buffers, which the kernel reads in place instead of a torch.cat
            # into one 576-wide q (a copy per layer that FA3-MLA does not make either).
            q = tuple(reshape_query_for_spec_decode(part, attn_metadata.num_decodes) for part in q)
        else:
            q = reshape_query_for_spec_decode(q, attn_metadata.num_decodes)
        out, lse = _flash_mla_decode(
            q,
            kv_c_and_k_pe_cache.unsqueeze(-2),  # [num_pages, page_size, h_kv=1, d_qk]
            decode.block_table,
            decode.seq_lens,
            decode.tile_scheduler_metadata,
            decode.num_splits,
            self.scale,
        )
        out = reshape_attn_output_for_spec_decode(out)
        if not self.need_to_return_lse_for_decode:
            return out, None
        # The DCP combine merges per (token, head): [b * s_q, h_q], natural log.
        return out, lse.transpose(1, 2).reshape(out.shape[0], out.shape[1])
