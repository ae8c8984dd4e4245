"""OpenAI-client requests (completion, chat, streaming) to `vllm serve` on the FLASHMLA backend.

Start a server first; with the tiny model shipped in the package (dummy weights, so the text is
noise, but every decode step runs vllm-flashmla's kernels):

    vllm serve "$(python -c 'from vllm_flashmla.models import TINY_MODEL_DIR; print(TINY_MODEL_DIR)')" \
        --attention-backend FLASHMLA --load-format dummy --max-model-len 4096

or a real model, e.g. `vllm serve deepseek-ai/DeepSeek-V2-Lite --trust-remote-code
--attention-backend FLASHMLA`. Its log shows "vllm-flashmla <version>: attention backend FLASHMLA
-> vllm_flashmla.backend.FlashMLABackend" when the plugin is installed. Then:

    python examples/serve_client.py [--base-url http://localhost:8000/v1]
"""

import argparse

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://localhost:8000/v1")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key="EMPTY")
    model = client.models.list().data[0].id
    print(f"model: {model}")

    completion = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=args.max_tokens, temperature=0.0
    )
    print(f"completion: {completion.choices[0].text!r}")

    chat = client.chat.completions.create(
        model=model,
        messages=[
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "What does multi-head latent attention compress?"},
        ],
        max_tokens=args.max_tokens,
        temperature=0.0,
    )
    print(f"chat: {chat.choices[0].message.content!r}")

    print("stream: ", end="", flush=True)
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Count from one to ten."}],
        max_tokens=args.max_tokens,
        temperature=0.0,
        stream=True,
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
