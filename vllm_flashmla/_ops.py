"""Loads the compiled extension and registers fake (meta) kernels for its ops.

The ops mutate preallocated outputs and return nothing, so their fakes are no-ops; that is all
torch.compile needs to trace through them, and CUDA-graph capture needs nothing more.
"""

from __future__ import annotations

import torch

from . import _layout

# torch.ops.flashmla_kernels once loaded. A module global rather than functools.cache: torch.compile
# traces ops() like any other function, reading a loaded namespace as a constant of the graph.
_OPS = None


def ops():
    """torch.ops.flashmla_kernels, with the extension loaded and its layout checked."""
    if _OPS is None:
        _load()
    return _OPS


def try_load() -> None:
    """Load the extension if it loads cleanly; otherwise leave the error to the first ops() call, which
    raises it again (an extension that is not built, or one built from other sources than this
    package's). The public API calls this on import, so that a compiled graph's first trace finds the
    ops loaded (the loading itself, an import and fake registrations, cannot be traced), while importing
    the API, as vLLM does with every candidate backend when it picks one, never fails for it."""
    try:
        ops()
    except Exception:  # noqa: BLE001  (re-raised by ops() at the first use)
        pass


def _load() -> None:
    global _OPS
    try:
        import flashmla_kernels  # noqa: F401  (importing registers the ops)
    except ImportError as exc:
        raise ImportError(
            "vllm_flashmla's CUDA extension `flashmla_kernels` is not built or not importable "
            f"({exc}). Install the package with `pip install --no-build-isolation -e .` (see README.md)."
        ) from exc
    _layout.check_against_extension(torch.ops.flashmla_kernels.layout_info())

    @torch.library.register_fake("flashmla_kernels::get_mla_metadata")
    def _(cache_seqlens, num_sm_parts, num_q_rows, records, num_splits):
        return None

    @torch.library.register_fake("flashmla_kernels::decode")
    def _(q, q_rope, k_cache, block_table, cache_seqlens, records, num_splits, softmax_scale, causal, out, lse,
          o_accum, lse_accum):
        return None

    _OPS = torch.ops.flashmla_kernels
