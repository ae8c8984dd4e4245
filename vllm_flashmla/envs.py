"""Environment variables read by vllm_flashmla, each evaluated when accessed."""

import os
from collections.abc import Callable
from typing import Any

environment_variables: dict[str, Callable[[], Any]] = {
    # "1" or "true": the vLLM plugin leaves AttentionBackendEnum.FLASHMLA on vLLM's own
    # FlashMLA backend instead of pointing it at ours.
    "VLLM_FLASHMLA_DISABLE": lambda: os.getenv("VLLM_FLASHMLA_DISABLE", "0")
    .strip()
    .lower()
    in ("1", "true"),
}


def __getattr__(name: str) -> Any:
    if name in environment_variables:
        return environment_variables[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return list(environment_variables)
