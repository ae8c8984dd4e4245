"""Batched offline generation with vLLM on the FLASHMLA backend (vllm-flashmla's decode kernels).

By default this runs the tiny DeepSeek-V3-architecture model shipped in vllm_flashmla/models with
dummy weights, so the text is noise but every decode step runs our kernels. Point --model at a
real checkpoint to get real text:

    python examples/offline_generate.py
    python examples/offline_generate.py --model deepseek-ai/DeepSeek-V2-Lite --trust-remote-code

Needs an sm90 (Hopper) GPU and the package installed (pip install --no-build-isolation -e .),
which registers the vLLM plugin that points the FLASHMLA backend at our kernels.
"""

import argparse

from vllm import LLM, SamplingParams
from vllm.plugins import load_general_plugins
from vllm.v1.attention.backends.registry import AttentionBackendEnum

from vllm_flashmla.models import TINY_MODEL_DIR
from vllm_flashmla.plugin import BACKEND_CLASS_PATH

PROMPTS = [
    "The capital of France is",
    "Multi-head latent attention compresses the KV cache by",
    "Write a haiku about GPUs:",
    "def fibonacci(n):",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default=str(TINY_MODEL_DIR), help="model directory or hub id (default: the tiny model)"
    )
    parser.add_argument(
        "--load-format",
        default=None,
        help="vLLM load format (default: 'dummy' for the tiny model, which has no weights, else 'auto')",
    )
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--block-size", type=int, default=64, help="KV block size, a multiple of 64")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--num-prompts", type=int, default=16, help="batch size (the prompts repeat)")
    parser.add_argument("--enforce-eager", action="store_true", help="disable CUDA graphs")
    args = parser.parse_args()

    # vLLM loads plugins itself; checking here turns a missing install into an error instead of
    # a silent run on vLLM's own FlashMLA backend.
    load_general_plugins()
    if AttentionBackendEnum.FLASHMLA.get_path() != BACKEND_CLASS_PATH:
        raise SystemExit(
            "FLASHMLA does not point at vllm-flashmla: install the package "
            "(pip install --no-build-isolation -e .) and unset VLLM_FLASHMLA_DISABLE"
        )

    load_format = args.load_format or ("dummy" if args.model == str(TINY_MODEL_DIR) else "auto")
    llm = LLM(
        model=args.model,
        load_format=load_format,
        trust_remote_code=args.trust_remote_code,
        tensor_parallel_size=args.tensor_parallel_size,
        block_size=args.block_size,
        max_model_len=args.max_model_len,
        enforce_eager=args.enforce_eager,
        attention_config={"backend": "FLASHMLA"},
    )
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.num_prompts)]
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=args.max_tokens))
    for output in outputs:
        print(f"{output.prompt!r} -> {output.outputs[0].text!r}")


if __name__ == "__main__":
    main()
