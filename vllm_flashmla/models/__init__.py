"""A tiny DeepSeek-V3-architecture model shipped with the package, for tests and examples.

``TINY_MODEL_DIR`` holds config.json and a byte-level tokenizer but no weights: vLLM serves it
with ``--load-format dummy``. Dummy weights give near-uniform logits, useless for comparing
backends, so ``save_random_checkpoint`` writes a loadable random-weight copy for that.
"""

import json
import shutil
from pathlib import Path

TINY_MODEL_DIR = Path(__file__).resolve().parent / "tiny-deepseek-v3"

# With transformers' N(0, 0.02) init every attention score is ~0.07 and attention is
# uniform, so a decode kernel that reads the wrong pages or mis-scales the softmax barely
# moves the logits. Raising the gain of the RMSNorms on the q and kv latents to 4 makes
# scores O(1): a 10% softmax-scale error then shifts greedy logprobs by ~0.07, while
# bf16 rounding inside attention shifts them by < 0.005.
LATENT_NORM_GAIN = 4.0

_TEXT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")


def save_random_checkpoint(
    dst_dir: str | Path, seed: int = 0, config_overrides: dict | None = None
) -> Path:
    """Write the tiny model with random bfloat16 weights (safetensors) to dst_dir.

    config_overrides replaces keys of the tiny model's config.json (e.g. more attention heads
    for tensor parallelism); the weights are drawn for, and config.json written with, the result.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, DeepseekV3ForCausalLM

    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    for name in _TEXT_FILES:
        shutil.copy(TINY_MODEL_DIR / name, dst / name)
    if config_overrides:
        config = json.loads((dst / "config.json").read_text())
        config.update(config_overrides)
        (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(AutoConfig.from_pretrained(dst))
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(("q_a_layernorm", "kv_a_layernorm")):
                module.weight.fill_(LATENT_NORM_GAIN)
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst
