"""GPU end-to-end tests: vLLM 0.26 running the tiny DeepSeek-V3 model on the FLASHMLA backend.

Greedy generation with our decode kernels is compared with vLLM's TRITON_MLA backend on a
random-weight checkpoint (vllm_flashmla.models.save_random_checkpoint), with CUDA graphs on and
off, KV block sizes 64/128/256 and speculative decoding (s_q > 1); a negative control shows the
comparison catches a 25% softmax-scale error. A `vllm serve` subprocess answers the OpenAI API.

Each LLM runs in a fresh subprocess (this file is also the worker script: see _worker) with the
engine in that process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so the worker can wrap
vllm_flashmla.backend._flash_mla_decode to count kernel calls, note each s_q, and perturb it.
"""

import asyncio
import collections
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

# Between two correct backends the only difference is bf16 rounding inside attention. On the
# random checkpoint that moves greedy logprobs by < 0.005 (~10x below LOGPROB_ATOL), and it flips
# the top-1 token only where the top two candidates are near-tied, in < 1% of steps, the rate
# also seen between vLLM's own MLA backends; MIN_AGREEMENT leaves room for twice that. A 25%
# softmax-scale error moves logprobs by ~0.2 and flips ~25% of steps.
LOGPROB_ATOL = 0.05
MIN_AGREEMENT = 0.98
# A run that diverges early compares little; demand that most steps were compared.
MIN_COMPARED_FRACTION = 0.5
NEGATIVE_CONTROL_SCALE = 1.25


pytest.importorskip("vllm")
pytestmark = pytest.mark.gpu  # conftest.py skips it without a Hopper GPU


# --- workload -------------------------------------------------------------------------------


def _prompts() -> tuple[list[list[int]], list[int]]:
    """30 byte-token prompts whose lengths straddle 64-token page boundaries (so decode crosses
    them), with output lengths that shrink the batch mid-run; 30 requests are padded to a
    CUDA-graph batch of 32, so padding requests (seq_len 0) run in every graph replay."""
    gen = torch.Generator().manual_seed(0)
    lengths = [1, 2, 17, 63, 64, 65, 127, 128, 129, 191, 255, 256, 257, 300, 383, 511, 512, 513, 640, 700]
    lengths += torch.randint(3, 700, (10,), generator=gen).tolist()
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in lengths]
    max_tokens = [(24, 32, 40)[i % 3] for i in range(len(prompts))]
    return prompts, max_tokens


def compare_greedy(reference: list[dict], candidate: list[dict]) -> list[str]:
    """Compare two greedy runs step by step; return what fails (empty: they agree).

    While the runs share a prefix, the chosen token's logprob may differ by LOGPROB_ATOL. Where
    they pick different tokens, each run must rank the other's token within LOGPROB_ATOL of its
    own choice (a near-tie that rounding may flip); the continuations then differ, so the
    comparison of that prompt stops there.
    """
    failures = []
    matched = diverged = total = 0
    max_diff = 0.0
    for i, (ref, cand) in enumerate(zip(reference, candidate, strict=True)):
        total += len(ref["tokens"])
        for step, (tok_r, tok_c) in enumerate(zip(ref["tokens"], cand["tokens"], strict=True)):
            lp_r, lp_c = ref["logprobs"][step], cand["logprobs"][step]
            if tok_r == tok_c:
                diff = abs(lp_r[str(tok_r)] - lp_c[str(tok_c)])
                if diff > max_diff:
                    max_diff = diff
                matched += 1
                continue
            diverged += 1
            if not (_near_tie(lp_r, tok_r, tok_c) and _near_tie(lp_c, tok_c, tok_r)):
                failures.append(f"prompt {i} step {step}: {tok_r} vs {tok_c} is no near-tie ({lp_r} / {lp_c})")
            break
    compared = matched + diverged
    agreement = matched / compared
    if max_diff > LOGPROB_ATOL:
        failures.append(f"logprobs differ by up to {max_diff:.4f} > {LOGPROB_ATOL}")
    if agreement < MIN_AGREEMENT:
        failures.append(f"greedy tokens agree in {agreement:.2%} of steps < {MIN_AGREEMENT:.0%}")
    if compared < MIN_COMPARED_FRACTION * total:
        failures.append(f"only {compared} of {total} steps compared before the runs diverged")
    return failures


def _near_tie(logprobs: dict[str, float], chosen: int, other: int) -> bool:
    return str(other) in logprobs and logprobs[str(chosen)] - logprobs[str(other)] <= LOGPROB_ATOL


# --- engine runs in subprocesses ------------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("VLLM_FLASHMLA_DISABLE", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["HF_HUB_OFFLINE"] = "1"
    # vLLM's PyTorch sampler: the runs being compared differ in the attention backend only.
    env["VLLM_USE_FLASHINFER_SAMPLER"] = "0"
    return env


def run_engine(model: Path, out_dir: Path, backend: str, **options) -> dict:
    prompts, max_tokens = _prompts()
    out = out_dir / f"{backend}-{'-'.join(f'{k}={v}' for k, v in sorted(options.items()))}.json"
    spec = dict(model=str(model), backend=backend, prompts=prompts, max_tokens=max_tokens, out=str(out))
    spec.update(options)
    env = {**_env(), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    if options.get("v2_model_runner"):
        env["VLLM_USE_V2_MODEL_RUNNER"] = "1"
    proc = subprocess.run(
        [sys.executable, __file__, json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, f"engine run {backend} {options} failed:\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())


def _worker(spec: dict) -> None:
    from vllm import LLM, SamplingParams

    from vllm_flashmla import backend, plugin

    plugin.register()  # the engine runs in this process; no reliance on the installed entry point
    decode_calls = collections.Counter()
    kernel = backend._flash_mla_decode
    scale_factor = spec.get("scale_factor", 1.0)

    def counting_decode(q, k_cache, block_table, cache_seqlens, tile, splits, softmax_scale):
        decode_calls[(q[0] if isinstance(q, tuple) else q).shape[1]] += 1  # s_q; q may come as (latent, rope)
        return kernel(q, k_cache, block_table, cache_seqlens, tile, splits, softmax_scale * scale_factor)

    backend._flash_mla_decode = counting_decode

    kwargs = {}
    if spec.get("cuda_graphs", True):
        kwargs["compilation_config"] = {"cudagraph_mode": "FULL_AND_PIECEWISE"}
    else:
        kwargs["enforce_eager"] = True
    if spec.get("speculative_tokens"):
        # n-gram drafting needs no draft model (the tiny checkpoint has no MTP layers); greedy
        # random-weight models repeat themselves, so drafts are found and verified often.
        kwargs["speculative_config"] = {
            "method": "ngram",
            "num_speculative_tokens": spec["speculative_tokens"],
            "prompt_lookup_min": 1,
            "prompt_lookup_max": 3,
        }
    llm = LLM(
        model=spec["model"],
        attention_config={"backend": spec["backend"]},
        block_size=spec.get("block_size", 64),
        max_model_len=1024,
        gpu_memory_utilization=0.4,
        seed=0,
        **kwargs,
    )
    params = [SamplingParams(temperature=0.0, max_tokens=n, logprobs=5, ignore_eos=True) for n in spec["max_tokens"]]
    outputs = llm.generate([{"prompt_token_ids": p} for p in spec["prompts"]], params)
    results = [
        {
            "tokens": list(o.outputs[0].token_ids),
            "logprobs": [{str(tok): lp.logprob for tok, lp in step.items()} for step in o.outputs[0].logprobs],
        }
        for o in outputs
    ]
    v2_model_runner = llm.llm_engine.vllm_config.use_v2_model_runner
    Path(spec["out"]).write_text(
        json.dumps({"results": results, "decode_calls": decode_calls, "v2_model_runner": v2_model_runner})
    )


# --- greedy comparison with TRITON_MLA ------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from vllm_flashmla.models import save_random_checkpoint

    return save_random_checkpoint(tmp_path_factory.mktemp("tiny-random"))


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def reference(checkpoint, runs_dir) -> list[dict]:
    run = run_engine(checkpoint, runs_dir, "TRITON_MLA")
    assert run["decode_calls"] == {}
    return run["results"]


@pytest.mark.parametrize("block_size", [64, 128, 256])
@pytest.mark.parametrize("cuda_graphs", [True, False], ids=["cuda-graphs", "eager"])
def test_greedy_matches_triton_mla(checkpoint, runs_dir, reference, cuda_graphs, block_size):
    run = run_engine(checkpoint, runs_dir, "FLASHMLA", cuda_graphs=cuda_graphs, block_size=block_size)
    assert run["decode_calls"], "the FLASHMLA run never called vllm_flashmla's decode kernel"
    assert compare_greedy(reference, run["results"]) == []


def test_greedy_matches_triton_mla_on_the_v2_model_runner(checkpoint, runs_dir, reference):
    # vLLM 0.26 runs DeepseekV2ForCausalLM (DeepSeek-V2-Lite) on its V2 model runner by default; the tiny
    # checkpoint's MoE DeepseekV3 config takes the V1 runner, so V2 is asked for here.
    run = run_engine(checkpoint, runs_dir, "FLASHMLA", v2_model_runner=True)
    assert run["v2_model_runner"], "vLLM fell back to the V1 model runner (see its log for the reason)"
    assert run["decode_calls"], "the FLASHMLA run never called vllm_flashmla's decode kernel"
    assert compare_greedy(reference, run["results"]) == []


def test_negative_control_perturbed_softmax_scale_is_caught(checkpoint, runs_dir, reference):
    run = run_engine(checkpoint, runs_dir, "FLASHMLA", scale_factor=NEGATIVE_CONTROL_SCALE)
    assert run["decode_calls"]
    assert compare_greedy(reference, run["results"]) != []


def test_speculative_decoding_decodes_several_tokens_per_request(checkpoint, runs_dir, reference):
    # Verification steps in which every request carries drafts are uniform s_q > 1 decode batches.
    run = run_engine(checkpoint, runs_dir, "FLASHMLA", speculative_tokens=3)
    assert any(int(s_q) > 1 for s_q in run["decode_calls"]), run["decode_calls"]
    assert compare_greedy(reference, run["results"]) == []


# --- vllm serve ----------------------------------------------------------------------------

SERVED_NAME = "tiny-deepseek-v3"
PLUGIN_LOG_LINE = "attention backend FLASHMLA -> vllm_flashmla.backend.FlashMLABackend"


SERVER_START_TIMEOUT_S = 900


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(log_path: Path, chars: int = 6000) -> str:
    return log_path.read_text(errors="replace")[-chars:]


def _wait_until_healthy(proc: subprocess.Popen, url: str, log_path: Path) -> None:
    """Poll `vllm serve`'s /health until it answers 200; fail with the log's tail if the server
    exits or is not healthy within SERVER_START_TIMEOUT_S."""
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while True:
        assert proc.poll() is None, f"vllm serve exited with {proc.returncode}:\n{_log_tail(log_path)}"
        assert time.monotonic() < deadline, (
            f"vllm serve not healthy after {SERVER_START_TIMEOUT_S} s:\n{_log_tail(log_path)}"
        )
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:  # not listening yet, or 503 while the engine starts
            pass
        time.sleep(2)


def _assert_plugin_loaded(log_path: Path) -> None:
    # vLLM loads our plugin only through the installed entry point; without it the server would
    # run vLLM's own FlashMLA backend and test nothing of ours.
    assert PLUGIN_LOG_LINE in log_path.read_text(), (
        "vllm serve did not load the vllm-flashmla plugin: install the package "
        "(pip install --no-build-isolation -e .)"
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`vllm serve` of the tiny model with dummy weights; yields its base URL."""
    from vllm_flashmla.models import TINY_MODEL_DIR

    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(TINY_MODEL_DIR),
        "--attention-backend", "FLASHMLA",
        "--load-format", "dummy",
        "--served-model-name", SERVED_NAME,
        "--max-model-len", "1024",
        "--gpu-memory-utilization", "0.4",
        "--host", "127.0.0.1",
        "--port", str(port),
    ]  # fmt: skip
    with open(log_path, "w") as log:
        env = {**_env(), "VLLM_LOGGING_LEVEL": "INFO"}  # the plugin's line is logged at INFO
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_until_healthy(proc, base, log_path)
        _assert_plugin_loaded(log_path)
        yield f"{base}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server, api_key="EMPTY", max_retries=0, timeout=300)


def test_serve_completions(client):
    r = client.completions.create(
        model=SERVED_NAME, prompt="The capital of France is", max_tokens=16, temperature=0.0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert r.usage.completion_tokens == 16
    assert r.choices[0].finish_reason == "length"
    assert isinstance(r.choices[0].text, str)


def test_serve_chat_completions(client):
    r = client.chat.completions.create(
        model=SERVED_NAME,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}],
        max_tokens=16,
        temperature=0.0,
        extra_body={"ignore_eos": True},
    )
    assert r.usage.completion_tokens == 16
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.role == "assistant"


def test_serve_streaming(client):
    stream = client.completions.create(
        model=SERVED_NAME, prompt="Once upon a time", max_tokens=24, temperature=0.0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = list(stream)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert len([c for c in chunks if c.choices]) > 1
    assert chunks[-1].usage.completion_tokens == 24

    chat = client.chat.completions.create(
        model=SERVED_NAME, messages=[{"role": "user", "content": "Count to ten."}], max_tokens=24,
        stream=True, extra_body={"ignore_eos": True},
    )  # fmt: skip
    chat_chunks = list(chat)
    assert chat_chunks[-1].choices[0].finish_reason == "length"
    assert len(chat_chunks) > 2


def test_serve_256_concurrent_requests(server):
    from openai import AsyncOpenAI

    num_requests, max_tokens = 256, 32

    async def main():
        client = AsyncOpenAI(base_url=server, api_key="EMPTY", max_retries=0, timeout=600)
        requests = [
            client.completions.create(
                model=SERVED_NAME,
                # lengths 1..~700 tokens: the batch mixes short and multi-page requests
                prompt=f"request {i}: " + "lorem ipsum " * (i % 59),
                max_tokens=max_tokens,
                temperature=0.0,
                extra_body={"ignore_eos": True},
            )
            for i in range(num_requests)
        ]
        try:
            return await asyncio.gather(*requests, return_exceptions=True)
        finally:
            await client.close()

    results = asyncio.run(main())
    failures = [r for r in results if isinstance(r, BaseException)]
    assert failures == [], f"{len(failures)} of {num_requests} requests failed, first: {failures[:1]}"
    assert all(r.usage.completion_tokens == max_tokens for r in results)


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]))
