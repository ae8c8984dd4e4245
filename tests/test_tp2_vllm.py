"""Tensor parallelism end to end: `vllm serve -tp 2 --attention-backend FLASHMLA` on two Hopper GPUs.

A random-weight tiny DeepSeek-V3 checkpoint with 32 attention heads (16 per rank at TP=2) is served
with tensor parallelism 2, and the test shows that
(1) greedy tokens and logprobs agree with a TP=1 run of the same checkpoint and seed (the engine
    runner of test_e2e_vllm.py, same prompts, same compare_greedy tolerance);
(2) 64 concurrent completions all succeed;
(3) on each TP rank our plugin pointed FLASHMLA at our backend before that rank chose FLASHMLA
    (log lines attributed to each rank's worker process).

NVLink multicast stays off in every process this module starts (NO_MULTICAST_ENV): on the shared GPU
host a multicast setup can take the GPUs out of service.
"""

import asyncio
import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

# The TP=1 engine runner, the prompts and the comparison are the single-GPU e2e test's, so both
# tests hold our backend to the same tolerance. (That module skips itself without vLLM, and with
# it this one.)
from test_e2e_vllm import (
    PLUGIN_LOG_LINE,
    _assert_plugin_loaded,
    _env,
    _free_port,
    _prompts,
    _wait_until_healthy,
    compare_greedy,
    run_engine,
)

TP = 2
# DeepSeek-V3 has 128 heads (8 to 16 per GPU in practice); 32 gives each of the 2 ranks 16 heads.
NUM_HEADS = 32
SERVED_NAME = "tiny-deepseek-v3-32h"

NO_MULTICAST_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
    # vLLM's symmetric-memory all-reduce is useless without multicast (it finds no multicast
    # pointer and falls back); don't even set up its symmetric buffers.
    "VLLM_ALLREDUCE_USE_SYMM_MEM": "0",
}

# Logged by vllm/platforms/cuda.py (CudaPlatform.get_attn_backend_cls) in the process that builds
# the attention layers once the requested backend validated; it names the enum member only, so
# the plugin's PLUGIN_LOG_LINE from the same process says which class that member pointed to.
BACKEND_SELECTED_LINE = "Using AttentionBackendEnum.FLASHMLA backend."


def _two_hoppers() -> bool:
    return torch.cuda.device_count() >= TP and all(
        torch.cuda.get_device_capability(i) == (9, 0) for i in range(TP)
    )


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.multigpu,
    pytest.mark.skipif(not _two_hoppers(), reason=f"needs {TP} sm90 (Hopper) GPUs for tensor parallelism"),
]


@pytest.fixture(scope="module", autouse=True)
def _no_multicast():
    """Set NO_MULTICAST_ENV in os.environ while this module runs: run_engine and the server build
    their environments from os.environ, so every subprocess inherits it."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in NO_MULTICAST_ENV.items():
            mp.setenv(name, value)
        yield


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from vllm_flashmla.models import save_random_checkpoint

    # MLA has one latent KV head whatever num_key_value_heads says; keep the config consistent.
    overrides = {"num_attention_heads": NUM_HEADS, "num_key_value_heads": NUM_HEADS}
    return save_random_checkpoint(tmp_path_factory.mktemp("tiny-random-32h"), config_overrides=overrides)


@pytest.fixture(scope="module")
def tp1_reference(checkpoint, tmp_path_factory) -> list[dict]:
    """Greedy results of the same checkpoint on one GPU with our backend (seed 0, CUDA graphs,
    64-token blocks), in an in-process engine that counts our kernel's calls."""
    run = run_engine(checkpoint, tmp_path_factory.mktemp("runs"), "FLASHMLA")
    assert run["decode_calls"], "the TP=1 FLASHMLA run never called vllm_flashmla's decode kernel"
    return run["results"]


# --- vllm serve -tp 2 -----------------------------------------------------------------------


@dataclass
class Server:
    url: str  # http://host:port
    log_path: Path


def _pid_tagged_logging_config() -> dict:
    """vLLM's logging config with the process id in front of every record.

    Workers prefix their lines with "(Worker_TP<rank> pid=<pid>)" only once the TP group exists
    (vllm/v1/executor/multiproc_executor.py, WorkerProc.setup_proc_title_and_log_prefix), but they
    load the general plugins before that (WorkerWrapperBase.init_worker): the plugin's line has no
    rank prefix. The pid on every record ties it to the rank's later lines.
    """
    from vllm.logger import DEFAULT_LOGGING_CONFIG

    config = copy.deepcopy(DEFAULT_LOGGING_CONFIG)
    for formatter in config["formatters"].values():
        formatter["format"] = "[process %(process)d] " + formatter["format"]
    config["handlers"]["vllm"].update(formatter="vllm", level="INFO", stream="ext://sys.stdout")
    config["loggers"]["vllm"]["level"] = "INFO"  # the plugin's line is logged at INFO
    return config


def _stop_process_group(proc: subprocess.Popen, grace_s: float = 60) -> None:
    """SIGTERM the server's whole process group, then SIGKILL whatever is left after grace_s.

    The API server starts an engine core process and one worker per rank; signalling only the API
    server could leave a worker holding a GPU if the server dies uncleanly.
    """
    pgid = proc.pid  # start_new_session=True: the server leads its own process group
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        proc.wait()
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader: a zombie would keep the group alive
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            break  # every process of the group has exited
        time.sleep(1)
    else:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


@pytest.fixture(scope="module")
def tp2_server(checkpoint, tmp_path_factory):
    """`vllm serve` of the 32-head checkpoint with -tp 2 and our backend; yields a Server."""
    serve_dir = tmp_path_factory.mktemp("serve-tp2")
    log_path = serve_dir / "server.log"
    logging_config = serve_dir / "logging.json"
    logging_config.write_text(json.dumps(_pid_tagged_logging_config()))
    port = _free_port()
    # The TP=1 run's engine settings (run_engine/_worker in test_e2e_vllm.py). The token budget
    # per step is the LLM class's default on H100/H200 (the server's is 8192): the 30 prompts of
    # the greedy comparison (~9.3k tokens) are prefilled without being split, as in the TP=1 run.
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(checkpoint),
        "--attention-backend", "FLASHMLA",
        "-tp", str(TP),
        "--served-model-name", SERVED_NAME,
        "--seed", "0",
        "--max-model-len", "1024",
        "--block-size", "64",
        "--max-num-batched-tokens", "16384",
        "--gpu-memory-utilization", "0.4",
        "--compilation-config", json.dumps({"cudagraph_mode": "FULL_AND_PIECEWISE"}),
        "--host", "127.0.0.1",
        "--port", str(port),
    ]  # fmt: skip
    env = {
        **_env(),
        **NO_MULTICAST_ENV,
        "VLLM_LOGGING_LEVEL": "INFO",
        "VLLM_LOGGING_CONFIG_PATH": str(logging_config),
        "VLLM_LOGGING_COLOR": "0",  # plain "(Worker_TP0 pid=...)" prefixes to parse
        # Forked workers inherit the engine core's plugin registry and never run the plugin
        # themselves; spawned ones load it through the entry point and log it, so each rank's
        # log shows its own registration.
        "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
    }
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_healthy(proc, url, log_path)
        _assert_plugin_loaded(log_path)
        yield Server(url=url, log_path=log_path)
    finally:
        _stop_process_group(proc)


def _post_completions(url: str, bodies: list[dict]) -> list[dict | BaseException]:
    """POST all bodies to /v1/completions at once (they batch in the engine); per request, the
    response JSON or the exception it raised."""
    import httpx

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:

            async def one(body: dict) -> dict:
                r = await client.post("/v1/completions", json=body)
                if r.status_code != 200:  # keep the server's reason for the failure message
                    raise RuntimeError(f"HTTP {r.status_code}: {r.text[:1000]}")
                return r.json()

            return await asyncio.gather(*(one(b) for b in bodies), return_exceptions=True)

    return asyncio.run(main())


def _greedy_result(response: dict) -> dict:
    """A completion response as the {"tokens", "logprobs"} record compare_greedy reads.

    With return_tokens_as_token_ids the logprob keys are "token_id:<id>", not decoded text (which
    the byte-level tokenizer maps many ids to); each step holds the chosen token and the top 5.
    """
    choice = response["choices"][0]
    steps = choice["logprobs"]["top_logprobs"]
    return {
        "tokens": choice["token_ids"],
        "logprobs": [{key.removeprefix("token_id:"): lp for key, lp in step.items()} for step in steps],
    }


# tp1_reference comes first: pytest sets up same-scope fixtures in signature order, so the TP=1
# engine has finished and released GPU 0 before the TP=2 server starts.
def test_tp2_greedy_matches_tp1(tp1_reference, tp2_server):
    prompts, max_tokens = _prompts()
    bodies = [
        {
            "model": SERVED_NAME,
            "prompt": prompt,  # token ids, as in the TP=1 run
            "max_tokens": n,
            "temperature": 0.0,
            "logprobs": 5,
            "ignore_eos": True,
            "return_token_ids": True,
            "return_tokens_as_token_ids": True,
        }
        for prompt, n in zip(prompts, max_tokens, strict=True)
    ]
    responses = _post_completions(tp2_server.url, bodies)
    failures = [r for r in responses if isinstance(r, BaseException)]
    assert failures == [], f"{len(failures)} of {len(bodies)} requests failed, first: {failures[:1]}"
    tp2 = [_greedy_result(r) for r in responses]
    assert [len(r["tokens"]) for r in tp2] == max_tokens
    assert compare_greedy(tp1_reference, tp2) == []


def test_tp2_64_concurrent_requests(tp2_server):
    num_requests, max_tokens = 64, 32
    bodies = [
        {
            "model": SERVED_NAME,
            # lengths 1..~700 tokens: the batch mixes short and multi-page requests
            "prompt": f"request {i}: " + "lorem ipsum " * (i % 59),
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
        }
        for i in range(num_requests)
    ]
    results = _post_completions(tp2_server.url, bodies)
    failures = [r for r in results if isinstance(r, BaseException)]
    assert failures == [], f"{len(failures)} of {num_requests} requests failed, first: {failures[:1]}"
    assert all(r["usage"]["completion_tokens"] == max_tokens for r in results)
    assert all(r["choices"][0]["finish_reason"] == "length" for r in results)


def test_tp2_every_rank_selected_our_backend(tp2_server):
    """Each rank's worker process (pid from its "(Worker_TP<rank> pid=<pid>)" prefix) logged our
    plugin's registration and then vLLM's choice of FLASHMLA; a count of lines could be met by the
    API server and engine core processes alone."""
    log = tp2_server.log_path.read_text(errors="replace").splitlines()
    pids = {}
    for rank in range(TP):
        found = {m.group(1) for line in log if (m := re.search(rf"\(Worker_TP{rank} pid=(\d+)\)", line))}
        assert len(found) == 1, f"expected one worker process for TP rank {rank}, found pids {sorted(found)}"
        pids[rank] = found.pop()
    assert len(set(pids.values())) == TP, pids

    for rank, pid in pids.items():
        lines = [line for line in log if f"[process {pid}]" in line]
        registered = [i for i, line in enumerate(lines) if PLUGIN_LOG_LINE in line]
        selected = [i for i, line in enumerate(lines) if BACKEND_SELECTED_LINE in line]
        assert registered, f"TP rank {rank} (pid {pid}) did not register vllm-flashmla's backend"
        assert selected, f"TP rank {rank} (pid {pid}) did not select the FLASHMLA backend"
        # FLASHMLA already meant our class when the rank chose it.
        assert registered[0] < selected[0], f"TP rank {rank} chose FLASHMLA before our plugin registered it"
