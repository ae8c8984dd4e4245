"""vllm-flashmla: Hopper MLA decode kernels for DeepSeek models, served through vLLM.

Nothing heavy is imported here: the CUDA extension loads with vllm_flashmla.interface, on the first
lookup of get_mla_metadata or flash_mla_with_kvcache, so the vLLM plugin entry point stays cheap in
every process vLLM starts.
"""

__version__ = "0.1.0"


def __getattr__(name):
    if name in ("get_mla_metadata", "flash_mla_with_kvcache"):
        from . import interface

        return getattr(interface, name)
    raise AttributeError(f"module 'vllm_flashmla' has no attribute {name!r}")


__all__ = ["__version__", "get_mla_metadata", "flash_mla_with_kvcache"]
