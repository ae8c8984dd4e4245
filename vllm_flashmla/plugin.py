"""vLLM general plugin (entry point group ``vllm.general_plugins``, name ``flashmla``).

vLLM calls ``register()`` in every process it starts (front end, engine core, workers),
before choosing attention backends. It points ``AttentionBackendEnum.FLASHMLA`` at our
backend by class path only, so nothing heavy is imported until the backend is chosen.
"""

from vllm.logger import init_logger

BACKEND_CLASS_PATH = "vllm_flashmla.backend.FlashMLABackend"

# A child of vLLM's logger, so the line shows up in vLLM's log with its format and level.
logger = init_logger(f"vllm.{__name__}")


def register() -> None:
    from vllm.v1.attention.backends.registry import (
        AttentionBackendEnum,
        register_backend,
    )

    from vllm_flashmla import __version__, envs

    if envs.VLLM_FLASHMLA_DISABLE:
        logger.info("VLLM_FLASHMLA_DISABLE is set: vllm-flashmla is not registered")
        return
    if AttentionBackendEnum.FLASHMLA.get_path() == BACKEND_CLASS_PATH:
        return
    register_backend(AttentionBackendEnum.FLASHMLA, BACKEND_CLASS_PATH)
    logger.info(
        "vllm-flashmla %s: attention backend FLASHMLA -> %s",
        __version__,
        BACKEND_CLASS_PATH,
    )
