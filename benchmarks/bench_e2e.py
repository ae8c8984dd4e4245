#!/usr/bin/env python3
"""End-to-end decode benchmark: vLLM 0.26.0 serving a synthetic DeepSeek-V3 model on our FLASHMLA
backend vs vLLM's own FLASHMLA, FLASH_ATTN_MLA and TRITON_MLA backends, back to back on one GPU.

Each backend runs in a fresh subprocess (this file re-invoked with --worker) with the engine in that
process (VLLM_ENABLE_V1_MULTIPROCESSING=0), dummy weights, CUDA graphs at vLLM's default mode, prefix
caching off. A worker:

1. starts the engine and checks which MLA impl class its attention layers hold (the wrong one is an
   error), and that the KV cache holds every request for the whole run;
2. adds `batch` requests of `context` random prompt tokens and steps the engine until every request
   has its first output token, i.e. all prefill (chunked or not) is over;
3. decodes until `warmup` steps in a row gave every request one new token, then times `repeats *
   decode_steps` further consecutive steps, each of which must give every request exactly one new
   token: the interval between consecutive `step()` returns. Each return waits for a step's sampled
   tokens to reach the host, so an interval is one period of the engine's steady-state pipeline; no
   extra synchronisation is added, because it would drain the step that async scheduling has already
   queued and time something vLLM does not do. The timed steps are cut into `repeats` windows; per
   window TPOT = median step time and tokens/s = batch / TPOT; median/min/max over windows are kept;
4. profiles a few more decode steps with torch.profiler and reports how much GPU time went to the
   attention-decode kernels (classified by kernel name; the run fails if another backend's kernels
   show up), per step and as a fraction of all GPU time and of the step's wall time.

Results go to one JSON file, rewritten after every backend, so a run killed by a timeout keeps what
it finished. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
# Prefer an installed vllm_flashmla; fall back to the source tree (the parent only needs the tiny
# model's directory, which imports nothing heavy).
if importlib.util.find_spec("vllm_flashmla") is None:
    sys.path.append(str(REPO_ROOT))

from vllm_flashmla._layout import D_QK  # noqa: E402
from vllm_flashmla.models import TINY_MODEL_DIR  # noqa: E402

sys.path.insert(0, str(BENCH_DIR))
from results_io import default_results_path, git_state, nvidia_smi, write_json  # noqa: E402

BLOCK_SIZE = 64  # the page size of our kernels and of vLLM's FlashMLA
WORKER_MARK = "@@bench_e2e@@"  # worker lines the parent echoes to the console; the rest goes to the log
# No backend gets a worker with less time than this: imports, compilation and graph capture alone
# take about a minute.
MIN_WORKER_S = 90
# Decode steps the warm-up may spend beyond --warmup-steps before it has seen that many full steps
# in a row (the first steps after prefill may still be settling).
WARMUP_SLACK = 32
# Kernels a run lists in top_kernels by default: down to about 1% of a step's GPU time in the H200 runs.
TOP_KERNELS = 12
KERNEL_NAME_CHARS = 300  # of a kernel's name kept in top_kernels (template arguments make them long)
# Loop iterations of host_probe_ms: a few milliseconds of interpreter work, short next to a window.
HOST_PROBE_ITERATIONS = 100_000


@dataclass(frozen=True)
class Backend:
    attention_backend: str  # vLLM AttentionBackendEnum name passed as attention_config.backend
    impl_class: str  # the MLA impl class the model's attention layers must hold
    family: str  # KERNEL_FAMILIES key of the decode kernels it launches
    plugin_env: str | None  # VLLM_FLASHMLA_DISABLE for the worker; None: left unset


BACKENDS = {
    "ours": Backend("FLASHMLA", "vllm_flashmla.backend.FlashMLAImpl", "ours", None),
    # The same enum entry with our plugin kept off, so it stays on vLLM's bundled FlashMLA.
    "flashmla": Backend("FLASHMLA", "vllm.v1.attention.backends.mla.flashmla.FlashMLAImpl", "flashmla", "1"),
    "fa3mla": Backend(
        "FLASH_ATTN_MLA", "vllm.v1.attention.backends.mla.flashattn_mla.FlashAttnMLAImpl", "fa3mla", None
    ),
    "triton": Backend("TRITON_MLA", "vllm.v1.attention.backends.mla.triton_mla.TritonMLAImpl", "triton", None),
}

# Substrings of the (demangled) names of the kernels each backend launches for a decode step, taken
# from our csrc/ and from the symbol tables of vLLM 0.26.0's _flashmla_C and _vllm_fa3_C and its
# triton_decode_attention.py. Generic words ("mla", "combine", "decode") would also match vLLM's
# KV-cache write (concat_and_cache_mla) and Inductor's generated kernels, which every backend shares.
KERNEL_FAMILIES = {
    "ours": ("vllm_flashmla",),  # vllm_flashmla::sm90::decode_kernel, ::combine_kernel, ::scheduler_kernel
    "flashmla": ("flash_fwd_splitkv_mla", "flash_fwd_mla_combine", "get_mla_metadata_kernel"),
    "fa3mla": ("FlashAttnFwdSm90", "FlashAttnFwdCombine", "prepare_varlen_num_blocks"),
    "triton": ("_fwd_grouped_kernel_stage1", "_fwd_kernel_stage1", "_fwd_kernel_stage2"),
}
# The kernel each backend launches exactly once per attention layer and step: counts steps.
MAIN_KERNEL = {
    "ours": "decode_kernel",
    "flashmla": "flash_fwd_splitkv_mla_kernel",
    "fa3mla": "FlashAttnFwdSm90",
    "triton": "_fwd_grouped_kernel_stage1",
}


# --------------------------------------------------------------------------------------------------
# Synthetic model


def synthetic_config(base: dict, heads: int, layers: int, hidden: int, max_model_len: int) -> dict:
    """The tiny DeepSeek-V3 config.json with DeepSeek-V3's MLA shapes and more, dense, layers."""
    cfg = dict(base)
    cfg.update(
        {
            # DeepSeek-V3's MLA dimensions: exactly what the decode kernels see (d_qk 576, d_v 512).
            "kv_lora_rank": 512,
            "qk_rope_head_dim": 64,
            "qk_nope_head_dim": 128,
            "v_head_dim": 128,
            "q_lora_rank": 1536,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "num_hidden_layers": layers,
            # Every layer dense with a small MLP, so attention dominates the step. n_routed_experts
            # stays: vLLM then treats the model as MoE, like DeepSeek-V3, and picks the same model
            # runner (V1) it uses for the real one.
            "first_k_dense_replace": layers,
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "max_position_embeddings": max_model_len,
        }
    )
    return cfg


def write_model_dir(dst: Path, heads: int, layers: int, hidden: int, max_model_len: int) -> dict:
    """A loadable (load_format="dummy") model directory: tokenizer files and the synthetic config."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_MODEL_DIR / name, dst / name)
    base = json.loads((TINY_MODEL_DIR / "config.json").read_text())
    cfg = synthetic_config(base, heads, layers, hidden, max_model_len)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return cfg


def check_model_config(model_dir: Path, max_model_len: int) -> dict:
    """Parse the directory with vLLM's ModelConfig (needs no GPU) and check it is DeepSeek-V3 MLA."""
    from vllm.config import ModelConfig

    mc = ModelConfig(model=str(model_dir), max_model_len=max_model_len)
    hf = mc.hf_text_config
    facts = {
        "architectures": list(mc.architectures),
        "use_mla": mc.use_mla,
        "is_moe": mc.is_moe,
        "max_model_len": mc.max_model_len,
        "num_attention_heads": hf.num_attention_heads,
        "kv_lora_rank": hf.kv_lora_rank,
        "qk_rope_head_dim": hf.qk_rope_head_dim,
        "head_size": mc.get_head_size(),
        "dtype": str(mc.dtype),
    }
    expected = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "use_mla": True,
        "kv_lora_rank": 512,
        "qk_rope_head_dim": 64,
        "head_size": 576,
    }
    wrong = {k: facts[k] for k, v in expected.items() if facts[k] != v}
    if wrong:
        raise ValueError(f"synthetic config is not DeepSeek-V3 MLA as vLLM sees it: {wrong}")
    return facts


# --------------------------------------------------------------------------------------------------
# Kernel classification and statistics (pure functions)


def kernel_family(name: str) -> str | None:
    for family, patterns in KERNEL_FAMILIES.items():
        if any(p in name for p in patterns):
            return family
    return None


def totals_by_name(pairs: list[tuple[str, float]]) -> dict[str, list]:
    """{name: [total microseconds, count]} of profiled (name, microseconds) pairs."""
    per_name: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for name, us in pairs:
        per_name[name][0] += us
        per_name[name][1] += 1
    return per_name


def largest(per_name: dict[str, list], top_n: int) -> list[tuple[str, list]]:
    """The top_n entries of totals_by_name with the most time, largest first."""
    return sorted(per_name.items(), key=lambda kv: -kv[1][0])[:top_n]


def summarize_kernels(kernels: list[tuple[str, float]], num_layers: int, expected: str, top_n: int = TOP_KERNELS) -> dict:
    """Per-step GPU time by kernel from profiled (name, microseconds) pairs.

    The number of steps profiled is the number of main decode kernels of the expected backend divided
    by the number of attention layers, so a step cut at either end of the profile window counts only
    in part, like its kernels. `foreign_families` lists other backends whose attention kernels ran;
    `error` says why there are no per-step figures (no main kernel of the expected backend seen).
    """
    per_name = totals_by_name(kernels)
    total_us = sum(v[0] for v in per_name.values())
    family_us = defaultdict(float)
    main_calls = 0
    for name, (us, calls) in per_name.items():
        family = kernel_family(name)
        if family is None:
            continue
        family_us[family] += us
        if family == expected and MAIN_KERNEL[family] in name:
            main_calls += calls
    steps = main_calls / num_layers
    foreign = sorted(f for f in family_us if f != expected)
    if steps == 0:
        error = f"no {MAIN_KERNEL[expected]} kernel of {expected} among {len(kernels)} profiled GPU activities"
        return {"error": error, "foreign_families": foreign}
    attention_us = sum(family_us.values())
    top = largest(per_name, top_n)
    return {
        "error": None,
        "foreign_families": foreign,
        "profiled_steps": round(steps, 2),
        "gpu_us_per_step": round(total_us / steps, 1),
        "attention_us_per_step": round(attention_us / steps, 1),
        "attention_fraction": round(attention_us / total_us, 4),
        "kernel_families_us_per_step": {f: round(us / steps, 1) for f, us in sorted(family_us.items())},
        "top_kernels": [
            {
                "name": name[:KERNEL_NAME_CHARS],
                "family": kernel_family(name) or "other",
                "us_per_step": round(us / steps, 2),
                "calls_per_step": round(calls / steps, 2),
                "fraction": round(us / total_us, 4),
            }
            for name, (us, calls) in top
        ],
    }


def spread(values: list[float], digits: int) -> dict:
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
    }


def parse_task_stat(text: str) -> tuple[str, int, int]:
    """(thread name, CPU time in clock ticks, last CPU it ran on) from a /proc/<pid>/task/<tid>/stat line.
    The name sits in parentheses and may itself hold spaces or parentheses, so the fields are counted
    from the last ')'."""
    name = text[text.index("(") + 1 : text.rindex(")")]
    fields = text[text.rindex(")") + 2 :].split()
    # After the name: state is field 3 of proc(5), utime 14, stime 15, processor 39.
    return name, int(fields[11]) + int(fields[12]), int(fields[36])


def thread_cpu_snapshot(task_dir: str = "/proc/self/task") -> dict[int, tuple[str, int, int]]:
    """parse_task_stat of every thread of this process (Linux); threads that end while read are left out."""
    snap = {}
    for tid in os.listdir(task_dir):
        try:
            with open(os.path.join(task_dir, tid, "stat")) as f:
                snap[int(tid)] = parse_task_stat(f.read())
        except (OSError, ValueError, IndexError):
            continue
    return snap


def thread_cpu_report(before: dict, after: dict, wall_s: float, ticks_per_s: float, top_n: int = 8) -> list[dict]:
    """The threads that used most CPU between two snapshots: name, CPU seconds, the share of the wall
    time (1.0 = a core's worth all along, what a spinning thread shows) and the CPU each was last on."""
    rows = []
    for tid, (name, ticks, cpu) in after.items():
        used = (ticks - before.get(tid, (name, 0, cpu))[1]) / ticks_per_s
        rows.append({"tid": tid, "name": name, "cpu_s": round(used, 3), "share": round(used / wall_s, 3), "last_cpu": cpu})
    rows.sort(key=lambda r: -r["cpu_s"])
    return rows[:top_n]


def host_facts() -> dict:
    """Where the worker runs: the CPUs it may use and the machine's load (Linux; empty elsewhere)."""
    facts = {}
    if hasattr(os, "sched_getaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        facts["affinity_cpus"] = len(cpus)
        facts["affinity"] = cpus if len(cpus) <= 32 else f"{cpus[0]}-{cpus[-1]} ({len(cpus)})"
    if hasattr(os, "getloadavg"):
        facts["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    facts["cpu_count"] = os.cpu_count()
    return facts


def host_probe_ms(iterations: int = HOST_PROBE_ITERATIONS, tries: int = 3) -> float:
    """Milliseconds this thread takes for a fixed pure-Python loop (the median of `tries`). A decode
    step of these small models is bound by the Python host side, and in round 21 whole windows' steps
    took 1.3-1.8x longer in the slow host mode, in every backend's process alike; timed next to each window, this
    tells a host that ran slower for everything from a step that costs more."""
    times = []
    for _ in range(tries):
        start = time.perf_counter()
        acc = 0
        for i in range(iterations):
            acc += i & 7
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e3, 4)


def step_stats(step_s: list[float], batch: int, repeats: int) -> dict:
    """TPOT and tokens/s per window of consecutive decode steps, and their spread over windows."""
    n = len(step_s) // repeats
    windows = []
    for i in range(repeats):
        ms = [s * 1e3 for s in step_s[i * n : (i + 1) * n]]
        median = statistics.median(ms)
        deciles = statistics.quantiles(ms, n=10)
        windows.append(
            {
                "tpot_ms": round(median, 4),
                "tokens_per_s": round(batch / median * 1e3, 1),
                "p10_ms": round(deciles[0], 4),
                "p90_ms": round(deciles[-1], 4),
                "min_ms": round(min(ms), 4),
                "max_ms": round(max(ms), 4),
            }
        )
    return {
        "tokens_per_s": spread([w["tokens_per_s"] for w in windows], 1),
        "tpot_ms": spread([w["tpot_ms"] for w in windows], 4),
        "windows": windows,
    }


def summarize(records: list[dict]) -> dict:
    """Per backend over all its successful runs (rounds): spread over every window, and the ratio of
    its median tokens/s to ours, with the range the window extremes allow."""
    by_backend: dict[str, list[dict]] = defaultdict(list)
    for rec in records:
        if not rec.get("error") and rec.get("windows"):
            by_backend[rec["backend"]].append(rec)
    out = {}
    for backend, recs in by_backend.items():
        windows = [w for r in recs for w in r["windows"]]
        out[backend] = {
            "runs": len(recs),
            "tokens_per_s": spread([w["tokens_per_s"] for w in windows], 1),
            "tpot_ms": spread([w["tpot_ms"] for w in windows], 4),
        }
        for key in (
            "gpu_us_per_step",
            "attention_us_per_step",
            "attention_fraction",
            "attention_share_of_step",
            "gpu_share_of_step",
        ):
            values = [r[key] for r in recs if r.get(key) is not None]
            out[backend][key] = round(statistics.median(values), 4) if values else None
    ours = out.get("ours")
    for entry in out.values():
        if ours is None:
            entry["tokens_per_s_ratio_to_ours"] = entry["ratio_range"] = None
            continue
        t, o = entry["tokens_per_s"], ours["tokens_per_s"]
        entry["tokens_per_s_ratio_to_ours"] = round(t["median"] / o["median"], 4)
        entry["ratio_range"] = [round(t["min"] / o["max"], 4), round(t["max"] / o["min"], 4)]
    return out


# --------------------------------------------------------------------------------------------------
# Worker: one backend, one engine, in this process


def say(msg: str, t0: float) -> None:
    print(f"{WORKER_MARK} {time.monotonic() - t0:6.1f}s {msg}", flush=True)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def engine_facts(worker) -> dict:
    """Runs inside vLLM's worker (collective_rpc): what the engine actually built."""
    from vllm.model_executor.layers.attention.mla_attention import MLAAttention

    layers = [m for m in worker.get_model().modules() if isinstance(m, MLAAttention)]
    cfg = worker.vllm_config
    return {
        "impl_classes": sorted({_qualname(type(m.impl)) for m in layers}),
        "backend_classes": sorted({_qualname(m.attn_backend) for m in layers}),
        "attention_layers": len(layers),
        "cudagraph_mode": str(cfg.compilation_config.cudagraph_mode),
        "cudagraph_capture_sizes": list(cfg.compilation_config.cudagraph_capture_sizes or []),
        "async_scheduling": cfg.scheduler_config.async_scheduling,
        "max_num_batched_tokens": cfg.scheduler_config.max_num_batched_tokens,
        "num_gpu_blocks": cfg.cache_config.num_gpu_blocks,
        "block_size": cfg.cache_config.block_size,
        "model_runner": _qualname(type(worker.model_runner)),
    }


class StepError(RuntimeError):
    pass


class WrongBackend(RuntimeError):
    pass


def step_problem(outs: list, batch: int) -> str | None:
    """Why an engine step's (DELTA) outputs are not one new token for each of `batch` requests."""
    counts = [len(o.outputs[0].token_ids) for o in outs]
    if len(counts) != batch or any(c != 1 for c in counts) or any(o.finished for o in outs):
        return (
            f"a decode step returned {sum(counts)} tokens for {len(counts)} requests "
            f"(expected 1 for each of {batch}); preemption or finished requests?"
        )
    return None


def decode_step(engine, batch: int) -> None:
    problem = step_problem(engine.step(), batch)
    if problem:
        raise StepError(problem)


def worker_main(spec: dict) -> None:
    t0 = time.monotonic()
    rec = {"backend": spec["backend"], "expected_impl_class": spec["impl_class"], "phase": "starting"}
    path = spec["result_path"]
    try:
        run_worker_phases(spec, rec, t0)
    except Exception as exc:
        traceback.print_exc()
        rec["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        say(f"ERROR after phase {rec['phase']}: {rec['error'][:300]}", t0)
    write_json(path, rec)
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip vLLM's engine teardown: it can take many seconds, and nothing after the record matters.
    os._exit(1 if rec.get("error") else 0)


def run_worker_phases(spec: dict, rec: dict, t0: float) -> None:
    path, batch = spec["result_path"], spec["batch"]
    say(f"importing torch and vllm ({spec['attention_backend']})", t0)
    import numpy as np
    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import RequestOutputKind

    props = torch.cuda.get_device_properties(0)
    rec["device"] = {
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "sm_count": props.multi_processor_count,
        "memory_bytes": props.total_memory,
        "uuid": str(getattr(props, "uuid", "")) or None,
    }
    rec["versions"] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "vllm": vllm.__version__,
        "python": platform.python_version(),
    }
    decode_calls = [0]
    if spec["backend"] == "ours":
        import vllm_flashmla
        from vllm_flashmla import backend, plugin

        rec["versions"]["vllm_flashmla_path"] = os.path.dirname(vllm_flashmla.__file__)
        plugin.register()  # the engine runs in this process; no reliance on the installed entry point
        kernel = backend._flash_mla_decode

        # Called while CUDA graphs are captured (replays bypass Python): proves our kernels were used.
        def counting_decode(*args, **kwargs):
            decode_calls[0] += 1
            return kernel(*args, **kwargs)

        backend._flash_mla_decode = counting_decode

    t = time.monotonic()
    say("starting the engine (dummy weights, torch.compile, CUDA-graph capture)", t0)
    kwargs = {} if spec["async_scheduling"] is None else {"async_scheduling": spec["async_scheduling"]}
    llm = LLM(
        model=spec["model_dir"],
        attention_config={"backend": spec["attention_backend"]},
        load_format="dummy",
        block_size=BLOCK_SIZE,
        max_model_len=spec["max_model_len"],
        max_num_seqs=batch,
        enable_prefix_caching=False,
        gpu_memory_utilization=spec["gpu_memory_utilization"],
        seed=spec["seed"],
        # Only the decode batch size: the timed steps replay the full graph of exactly `batch`
        # requests. vLLM's default list (sizes up to 2 * max_num_seqs, a batch padded to the next
        # one) would only take longer to capture. Prefill steps, not timed, run without graphs.
        compilation_config={"cudagraph_capture_sizes": [batch]},
        **kwargs,
    )
    engine = llm.llm_engine
    facts = llm.collective_rpc(engine_facts)[0]
    rec["engine"] = facts
    rec["timings_s"] = {"engine_start": round(time.monotonic() - t, 1)}
    rec["impl_class"] = facts["impl_classes"][0] if len(facts["impl_classes"]) == 1 else facts["impl_classes"]
    rec["phase"] = "engine_ready"
    write_json(path, rec)
    say(f"engine ready: impl {rec['impl_class']}, cudagraph_mode {facts['cudagraph_mode']}", t0)
    if facts["impl_classes"] != [spec["impl_class"]]:
        raise WrongBackend(f"attention layers hold {facts['impl_classes']}, expected {spec['impl_class']}")
    needed = batch * -(-spec["max_model_len"] // BLOCK_SIZE)
    if facts["num_gpu_blocks"] is not None and facts["num_gpu_blocks"] < needed:
        raise RuntimeError(
            f"the KV cache holds {facts['num_gpu_blocks']} blocks, the run needs {needed}: "
            "lower --batch or --context, or raise --gpu-memory-utilization"
        )

    say(f"prefilling {batch} x {spec['context']} tokens", t0)
    t = time.monotonic()
    prompts = np.random.default_rng(spec["seed"]).integers(0, 256, (batch, spec["context"])).tolist()
    for i, ids in enumerate(prompts):
        params = SamplingParams(
            temperature=0.0,
            max_tokens=spec["max_tokens"],
            ignore_eos=True,
            detokenize=False,  # CPU work that is the same for every backend: kept out of the steps
            output_kind=RequestOutputKind.DELTA,  # each step's new tokens only
        )
        engine.add_request(str(i), {"prompt_token_ids": ids}, params)
    started: set[str] = set()
    prefill_steps = 0
    max_prefill_steps = 10 * -(-batch * spec["context"] // facts["max_num_batched_tokens"]) + 100
    while len(started) < batch:
        if prefill_steps >= max_prefill_steps:
            raise StepError(f"only {len(started)} of {batch} requests started decoding after {prefill_steps} steps")
        started.update(o.request_id for o in engine.step() if o.outputs[0].token_ids)
        prefill_steps += 1
    rec["timings_s"]["prefill"] = round(time.monotonic() - t, 1)
    rec["prefill_steps"] = prefill_steps
    rec["phase"] = "prefilled"
    write_json(path, rec)

    say(f"timing {spec['warmup_steps']} + {spec['repeats']} x {spec['decode_steps']} decode steps", t0)
    t = time.monotonic()
    full = attempts = 0
    while full < spec["warmup_steps"]:
        if attempts == spec["warmup_steps"] + WARMUP_SLACK:
            raise StepError(f"no {spec['warmup_steps']} full decode steps in a row within {attempts} steps")
        attempts += 1
        full = 0 if step_problem(engine.step(), batch) else full + 1
    rec["warmup_steps_run"] = attempts
    step_s, probes = [], []
    threads_before = thread_cpu_snapshot() if os.path.isdir("/proc/self/task") else None
    wall_before = time.perf_counter()
    for _ in range(spec["repeats"]):
        probes.append(host_probe_ms())  # between windows, outside every timed step
        prev = time.perf_counter()
        for _ in range(spec["decode_steps"]):
            decode_step(engine, batch)
            now = time.perf_counter()
            step_s.append(now - prev)
            prev = now
    probes.append(host_probe_ms())
    rec["timings_s"]["decode"] = round(time.monotonic() - t, 1)
    rec.update(step_stats(step_s, batch, spec["repeats"]))
    for window, before, after in zip(rec["windows"], probes, probes[1:]):
        window["host_probe_ms"] = [before, after]
    # Per-thread CPU over the timed steps: a host-bound step mode shows as a busy thread or a short share.
    rec["host"] = host_facts()
    if threads_before is not None:
        rec["host"]["threads"] = thread_cpu_report(
            threads_before, thread_cpu_snapshot(), time.perf_counter() - wall_before, os.sysconf("SC_CLK_TCK")
        )
    rec["step_ms"] = [round(s * 1e3, 4) for s in step_s]
    rec["phase"] = "timed"
    write_json(path, rec)
    tps, tpot = rec["tokens_per_s"], rec["tpot_ms"]
    say(
        f"{tps['median']:.0f} tokens/s [{tps['min']:.0f}, {tps['max']:.0f}], "
        f"TPOT {tpot['median']:.3f} ms [{tpot['min']:.3f}, {tpot['max']:.3f}], "
        f"host probe {min(probes):.2f}-{max(probes):.2f} ms",
        t0,
    )

    if spec["backend"] == "ours":
        rec["ours_decode_calls"] = decode_calls[0]
        if decode_calls[0] == 0:
            raise WrongBackend("vllm_flashmla's decode kernel was never called")

    t = time.monotonic()
    try:
        rec.update(profile_steps(engine, batch, spec, facts["attention_layers"]))
    except WrongBackend:
        raise
    except Exception as exc:  # the numbers above stand; only the breakdown is missing
        traceback.print_exc()
        rec["profile_error"] = f"{type(exc).__name__}: {exc}"[:1000]
    rec["timings_s"]["profile"] = round(time.monotonic() - t, 1)
    if rec.get("attention_us_per_step") is not None:
        step_us = tpot["median"] * 1e3
        rec["attention_share_of_step"] = round(rec["attention_us_per_step"] / step_us, 4)
        # Well below 1: the GPU waits for the CPU between steps, which dilutes kernel differences.
        rec["gpu_share_of_step"] = round(rec["gpu_us_per_step"] / step_us, 4)
        say(
            f"attention {rec['attention_us_per_step']:.0f} us/step = {rec['attention_fraction']:.1%} of GPU time, "
            f"{rec['attention_share_of_step']:.1%} of the step; GPU busy {rec['gpu_share_of_step']:.1%} of the step",
            t0,
        )
    rec["phase"] = "done"


def summarize_host_ops(ops: list[tuple[str, float]], steps: float, top_n: int = TOP_KERNELS) -> list[dict]:
    """Host time per step by operator from profiled (name, self CPU microseconds) pairs, the top_n
    largest: where a step's CPU time goes (Python-side ops, CUDA runtime calls such as a synchronize),
    which sets the step when the GPU waits for the host."""
    return [
        {"name": name[:KERNEL_NAME_CHARS], "self_us_per_step": round(us / steps, 2), "calls_per_step": round(calls / steps, 2)}
        for name, (us, calls) in largest(totals_by_name(ops), top_n)
    ]


def launch_facts(trace_events: list[dict], names: list[str]) -> dict[str, dict]:
    """How each named kernel was launched, from a torch.profiler Chrome trace's kernel events: its
    grid and block (the most common of its launches), the streams it ran on, and the share of its
    launches that overlapped in time a kernel on another stream (a kernel that shares the GPU with
    another one takes longer without doing more work)."""
    kernels = [e for e in trace_events if e.get("cat") == "kernel" and e.get("ph") == "X"]
    by_stream = defaultdict(list)
    for e in kernels:
        by_stream[e.get("args", {}).get("stream")].append((e["ts"], e["ts"] + e.get("dur", 0)))

    def overlaps(e) -> bool:
        t0, t1, own = e["ts"], e["ts"] + e.get("dur", 0), e.get("args", {}).get("stream")
        return any(a < t1 and t0 < b for stream, spans in by_stream.items() if stream != own for a, b in spans)

    facts = {}
    for name in names:
        launches = [e for e in kernels if e["name"][:KERNEL_NAME_CHARS] == name]
        if not launches:
            continue
        shapes = defaultdict(int)
        for e in launches:
            args = e.get("args", {})
            shapes[(tuple(args.get("grid") or ()), tuple(args.get("block") or ()))] += 1
        (grid, block), _ = max(shapes.items(), key=lambda kv: kv[1])
        facts[name] = {
            "grid": list(grid),
            "block": list(block),
            "streams": sorted({str(e.get("args", {}).get("stream")) for e in launches}),
            "overlapped": round(sum(map(overlaps, launches)) / len(launches), 3),
        }
    return facts


def profile_steps(engine, batch: int, spec: dict, num_layers: int) -> dict:
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(spec["profile_steps"]):
            decode_step(engine, batch)
        torch.cuda.synchronize()
    events = prof.events()
    kernels = [(e.name, e.time_range.elapsed_us()) for e in events if e.device_type == DeviceType.CUDA]
    summary = summarize_kernels(kernels, num_layers, spec["family"], spec["top_kernels"])
    if summary.get("profiled_steps"):
        host_ops = [(e.name, e.self_cpu_time_total) for e in events if e.device_type == DeviceType.CPU]
        summary["top_host_ops"] = summarize_host_ops(host_ops, summary["profiled_steps"], spec["top_kernels"])
    # The Chrome trace carries what events() does not: each kernel's grid, block and stream. Without
    # it the per-kernel times above still stand.
    trace_path = Path(spec["result_path"]).with_suffix(".trace.json")
    try:
        prof.export_chrome_trace(str(trace_path))
        trace = json.loads(trace_path.read_text()).get("traceEvents", [])
        facts = launch_facts(trace, [k["name"] for k in summary.get("top_kernels", [])])
        for k in summary.get("top_kernels", []):
            k.update(facts.get(k["name"], {}))
    except Exception as exc:
        summary["launch_facts_error"] = f"{type(exc).__name__}: {exc}"[:1000]
    finally:
        trace_path.unlink(missing_ok=True)
    # Full CUDA graphs: one launch per step; piecewise: one per graph piece between attention layers.
    graph_launches = sum(1 for e in events if e.name.startswith("cudaGraphLaunch"))
    if summary.get("profiled_steps"):
        summary["graph_launches_per_step"] = round(graph_launches / summary["profiled_steps"], 2)
    foreign = summary.pop("foreign_families")
    if foreign:
        raise WrongBackend(f"attention kernels of {', '.join(foreign)} ran in the {spec['backend']} run")
    return {"profile_error": summary.pop("error"), **summary}


# --------------------------------------------------------------------------------------------------
# Parent: plan, workers, results


# nvidia-smi fields recorded before and after the runs.
NVSMI_FIELDS = ["name", "driver_version", "clocks.sm", "clocks.max.sm", "power.limit", "temperature.gpu"]


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


# The caches a worker compiles into: vLLM's (its torch.compile graphs, with Inductor's code and
# autotuning under them), and Inductor's and Triton's own.
COMPILE_CACHE_VARS = ("VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")


def worker_env(backend: Backend, compile_cache: Path | None = None) -> dict[str, str]:
    """The worker's environment; with compile_cache, every compile cache lives under that (new)
    directory, so the worker compiles and autotunes the model itself instead of loading what an
    earlier worker left."""
    env = dict(os.environ)
    env.pop("VLLM_FLASHMLA_DISABLE", None)
    if backend.plugin_env is not None:
        env["VLLM_FLASHMLA_DISABLE"] = backend.plugin_env
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(
        {
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # engine in the worker: its model can be inspected
            "VLLM_USE_FLASHINFER_SAMPLER": "0",  # the same PyTorch sampler for every backend
            "HF_HUB_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    if compile_cache is not None:
        env.update({var: str(compile_cache / var.lower()) for var in COMPILE_CACHE_VARS})
    return env


def run_worker(cmd: list[str], env: dict, timeout_s: float, log_path: Path, on_line) -> tuple[int, bool]:
    """Run cmd in its own process group with output to log_path; marked lines go to on_line.
    Returns (exit status, timed out); on timeout or interrupt the whole group is killed."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )

        def pump():
            for line in proc.stdout:
                log.write(line)
                if line.startswith(WORKER_MARK):
                    on_line(line[len(WORKER_MARK) :].strip())

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            if proc.poll() is None:  # timeout, or the parent was interrupted
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            reader.join(timeout=10)
    return proc.returncode, timed_out


def finish_record(rec: dict, returncode: int, timed_out: bool, timeout_s: float, log_path: Path) -> dict:
    """Turn a worker's last saved record plus how it ended into the final record."""
    phase = rec.get("phase", "starting")
    if phase == "timed" and not rec.get("error") and (timed_out or returncode != 0):
        # The timed steps all passed their checks; only the profile is missing.
        rec["profile_error"] = (
            f"worker killed at its {timeout_s:.0f} s timeout while profiling"
            if timed_out
            else f"worker died with status {returncode} while profiling; see the log"
        )
    elif timed_out:
        rec["error"] = f"timed out after {timeout_s:.0f} s, after phase {phase!r}"
    elif not rec.get("error") and (returncode != 0 or phase != "done"):
        rec["error"] = f"worker exited with status {returncode} after phase {phase!r}"
    rec["returncode"] = returncode
    rec["log"] = str(log_path)
    rec.setdefault("error", None)
    return rec


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-lines:])
    except OSError:
        return ""


def record_line(rec: dict) -> str:
    if rec.get("error"):
        return f"ERROR: {rec['error'][:300]}"
    tps, tpot = rec["tokens_per_s"], rec["tpot_ms"]
    line = (
        f"{tps['median']:.0f} tokens/s [{tps['min']:.0f}, {tps['max']:.0f}], TPOT {tpot['median']:.3f} ms, "
        f"impl {rec['impl_class']}"
    )
    if rec.get("attention_fraction") is not None:
        line += f", attention {rec['attention_fraction']:.1%} of GPU time"
    if rec.get("profile_error"):
        line += f" (profile: {rec['profile_error'][:200]})"
    return line


def kernel_lines(rec: dict, n: int = 8) -> list[str]:
    return [
        f"      {k['us_per_step']:9.1f} us/step {k['fraction']:6.1%} {k['calls_per_step']:6.1f}x  "
        + (f"grid {'x'.join(map(str, k['grid']))} overlapped {k['overlapped']:4.0%}  " if "grid" in k else "")
        + f"[{k['family']}] {k['name'][:110]}"
        for k in rec.get("top_kernels", [])[:n]
    ]


def table(summary: dict, order: list[str]) -> str:
    rows = [
        (
            "backend",
            "runs",
            "tokens/s median [min, max]",
            "TPOT ms median [min, max]",
            "attn us/step",
            "attn/GPU",
            "attn/step",
            "GPU/step",
            "vs ours [range]",
        )
    ]
    for name in order:
        s = summary.get(name)
        if s is None:
            rows.append((name, "0", "failed", "", "", "", "", "", ""))
            continue
        t, p = s["tokens_per_s"], s["tpot_ms"]
        ratio = s["tokens_per_s_ratio_to_ours"]
        attn_us, fraction = s["attention_us_per_step"], s["attention_fraction"]
        share, gpu_share = s["attention_share_of_step"], s["gpu_share_of_step"]
        rows.append(
            (
                name,
                str(s["runs"]),
                f"{t['median']:.0f} [{t['min']:.0f}, {t['max']:.0f}]",
                f"{p['median']:.3f} [{p['min']:.3f}, {p['max']:.3f}]",
                "-" if attn_us is None else f"{attn_us:.0f}",
                "-" if fraction is None else f"{fraction:.1%}",
                "-" if share is None else f"{share:.1%}",
                "-" if gpu_share is None else f"{gpu_share:.1%}",
                "-" if ratio is None else f"{ratio:.3f}x [{s['ratio_range'][0]:.3f}, {s['ratio_range'][1]:.3f}]",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def markdown(doc: dict) -> str:
    """The README's table of one results file: per backend, decode throughput and TPOT (median over the
    windows of every run, with their extremes), the median step's GPU time and attention time from the
    profiled steps, the GPU's busy share of the step, and tokens/s relative to ours."""
    summary = summarize(doc["results"])
    lines = [
        "| backend | tokens/s median [min, max] | TPOT ms | GPU us/step | attention us/step | GPU busy | vs ours |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in doc["config"]["backends"]:
        s = summary.get(name)
        label = "ours (FLASHMLA via this plugin)" if name == "ours" else f"vLLM {BACKENDS[name].attention_backend}"
        if s is None:
            lines.append(f"| {label} | failed | | | | | |")
            continue
        t = s["tokens_per_s"]
        ratio = s["tokens_per_s_ratio_to_ours"]
        cells = [
            label,
            f"{t['median']:.0f} [{t['min']:.0f}, {t['max']:.0f}]",
            f"{s['tpot_ms']['median']:.2f}",
            "-" if s["gpu_us_per_step"] is None else f"{s['gpu_us_per_step']:.0f}",
            "-" if s["attention_us_per_step"] is None else f"{s['attention_us_per_step']:.0f}",
            "-" if s["gpu_share_of_step"] is None else f"{s['gpu_share_of_step']:.0%}",
            "-" if ratio is None else f"{ratio:.3f}x",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_order(backends: list[str], rounds: int) -> list[tuple[int, str]]:
    """(round, backend) in the order the workers run: the list, then reversed in every other round, so
    that each backend runs first as often as the others. Until this, ours ran first in every pair, and
    the slow host-side mode hit the first worker as often as it hit ours (docs/perf-notes.md, round 20):
    order and backend could not be told apart."""
    return [(r, name) for r in range(rounds) for name in (backends if r % 2 == 0 else backends[::-1])]


def plan(args) -> dict:
    """Everything a run is defined by, derived from the arguments (no GPU needed)."""
    timed = args.warmup_steps + WARMUP_SLACK + args.repeats * args.decode_steps + args.profile_steps
    # 1: the first token comes from prefill; 16: slack for the steps async scheduling runs ahead.
    max_tokens = 1 + timed + 16
    max_model_len = args.context + max_tokens
    kv_bytes = args.batch * max_model_len * args.layers * D_QK * 2
    return {
        "backends": args.backend_list,
        "rounds": args.rounds,
        "run_order": [f"{name}#{r + 1}" for r, name in run_order(args.backend_list, args.rounds)],
        "batch": args.batch,
        "context": args.context,
        "warmup_steps": args.warmup_steps,
        "decode_steps": args.decode_steps,
        "repeats": args.repeats,
        "profile_steps": args.profile_steps,
        "top_kernels": args.top_kernels,
        "max_tokens": max_tokens,
        "max_model_len": max_model_len,
        "kv_cache_gib_needed": round(kv_bytes / 2**30, 2),
        "model": {"heads": args.heads, "layers": args.layers, "hidden_size": args.hidden_size},
        "block_size": BLOCK_SIZE,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "async_scheduling": "off" if args.no_async_scheduling else "vLLM default",
        "fresh_compile": args.fresh_compile,
        "seed": args.seed,
        "time_budget_s": args.time_budget,
        "worker_timeout_s": args.worker_timeout,
    }


METHOD = {
    "engine": "vLLM LLM in the worker process (VLLM_ENABLE_V1_MULTIPROCESSING=0), load_format=dummy, "
    "prefix caching off, default CUDA-graph mode with capture size [batch], max_num_seqs=batch, greedy "
    "sampling with the PyTorch sampler, ignore_eos, detokenize off",
    "requests": "batch requests of `context` random token ids (seeded), all prefilled before timing; the "
    "same requests then decode warmup + repeats * decode_steps steps (context grows by that many tokens)",
    "timing": "interval between consecutive LLMEngine.step() returns; every step must return one token for "
    "every request; TPOT = median step of a window of decode_steps steps; tokens/s = batch / TPOT; "
    "median/min/max over the repeats windows; host_probe_ms of a window: a fixed pure-Python loop timed "
    "(median of 3) in the worker's thread just before and just after it, untimed, the host's speed then",
    "profile": "torch.profiler (CPU+CUDA) over profile_steps further steps; GPU time per kernel, attention = "
    "kernels of the KERNEL_FAMILIES name patterns; steps counted as main decode kernels / attention layers; "
    "for the top_kernels, the profile's Chrome trace gives grid, block, streams and the share of launches "
    "that overlapped a kernel on another stream",
    "attention_fraction": "attention kernel time / all GPU time of the profiled steps",
    "attention_share_of_step": "attention kernel time per step / median step time (wall)",
    "gpu_share_of_step": "all GPU time per step / median step time (wall); well below 1 means CPU-bound steps",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help=f"comma-separated, run in this order (default: {','.join(BACKENDS)})",
    )
    p.add_argument("--batch", type=int, default=64, help="concurrent requests = decode batch (default 64)")
    p.add_argument("--context", type=int, default=8192, help="prompt tokens per request (default 8192)")
    p.add_argument("--heads", type=int, default=16, help="query heads, h_q (default 16: DeepSeek-V3 at TP8)")
    p.add_argument("--layers", type=int, default=8, help="decoder layers (default 8)")
    p.add_argument("--hidden-size", type=int, default=1024, help="model width; the MLP is 2x (default 1024)")
    p.add_argument("--decode-steps", type=int, default=64, help="timed steps per window (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="timed windows per run (default 3)")
    p.add_argument("--warmup-steps", type=int, default=16, help="untimed decode steps first (default 16)")
    p.add_argument("--profile-steps", type=int, default=4, help="decode steps profiled afterwards (default 4)")
    p.add_argument(
        "--top-kernels",
        type=int,
        default=TOP_KERNELS,
        help=f"kernels listed per run in top_kernels, by GPU time per step, and as many host operators in "
        f"top_host_ops, by self CPU time per step (default {TOP_KERNELS})",
    )
    p.add_argument(
        "--rounds", type=int, default=1,
        help="run the backend list this many times, each run a fresh process, every other round in reverse order"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--no-async-scheduling", action="store_true", help="turn vLLM's async scheduling off")
    p.add_argument(
        "--fresh-compile",
        action="store_true",
        help="every worker compiles the model into new, temporary cache directories (VLLM_CACHE_ROOT, "
        "TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR) instead of loading the graphs and autotuning of an "
        "earlier worker of the same backend; adds the compile time (~20 s) to each worker",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=510,
        help="seconds for the whole run; backends that no longer fit are recorded as skipped (default 510)",
    )
    p.add_argument("--worker-timeout", type=float, default=300, help="seconds per backend at most (default 300)")
    p.add_argument("--out", help="results JSON (default: benchmarks/results/e2e_<gpu>_<utc time>.json)")
    p.add_argument("--log-dir", help="worker logs (default: a new temporary directory)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and check the model config; no GPU")
    p.add_argument(
        "--markdown",
        nargs="+",
        metavar="RESULTS_JSON",
        help="print the README table of each results file and exit (no GPU, no vLLM)",
    )
    p.add_argument("--worker", metavar="SPEC_JSON", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker or args.markdown:
        return args
    names = [n.strip() for n in args.backends.split(",") if n.strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names or len(set(names)) != len(names):
        p.error(f"--backends: choose distinct names from {','.join(BACKENDS)} (got {args.backends!r})")
    args.backend_list = names
    checks = {
        "--batch must be >= 1": args.batch >= 1,
        f"--context must be >= {BLOCK_SIZE}": args.context >= BLOCK_SIZE,
        "--heads must be in 1..128 (our kernels' limit)": 1 <= args.heads <= 128,
        "--layers must be >= 1": args.layers >= 1,
        "--hidden-size must be >= 64": args.hidden_size >= 64,
        "--decode-steps must be >= 4 (deciles per window)": args.decode_steps >= 4,
        "--repeats must be >= 1": args.repeats >= 1,
        "--warmup-steps must be >= 1": args.warmup_steps >= 1,
        "--profile-steps must be >= 1": args.profile_steps >= 1,
        "--top-kernels must be >= 1": args.top_kernels >= 1,
        "--rounds must be >= 1": args.rounds >= 1,
        "--gpu-memory-utilization must be in (0, 1]": 0 < args.gpu_memory_utilization <= 1,
        f"--worker-timeout must be >= {MIN_WORKER_S}": args.worker_timeout >= MIN_WORKER_S,
    }
    failed = [msg for msg, ok in checks.items() if not ok]
    if failed:
        p.error("; ".join(failed))
    return args


def run_backend(name: str, label: str, cfg: dict, args, model_dir: Path, log_dir: Path, timeout_s: float, say) -> dict:
    """One worker process for one backend; returns its final record."""
    backend = BACKENDS[name]
    stem = label.replace("#", "_")
    log_path, result_path = log_dir / f"{stem}.log", log_dir / f"{stem}.json"
    result_path.unlink(missing_ok=True)
    spec = {
        "backend": name,
        "attention_backend": backend.attention_backend,
        "impl_class": backend.impl_class,
        "family": backend.family,
        "model_dir": str(model_dir),
        "result_path": str(result_path),
        "async_scheduling": False if args.no_async_scheduling else None,
        **{
            k: cfg[k]
            for k in ("batch", "context", "warmup_steps", "decode_steps", "repeats", "profile_steps", "top_kernels")
            + ("max_tokens", "max_model_len", "seed", "gpu_memory_utilization")
        },
    }
    t = time.monotonic()
    compile_cache = Path(tempfile.mkdtemp(prefix=f"bench_e2e_{stem}_compile_")) if args.fresh_compile else None
    try:
        returncode, timed_out = run_worker(
            [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
            worker_env(backend, compile_cache),
            timeout_s,
            log_path,
            lambda line: say(f"    {label} | {line}"),
        )
    finally:
        if compile_cache is not None:
            shutil.rmtree(compile_cache, ignore_errors=True)
    try:
        rec = json.loads(result_path.read_text())
    except (OSError, ValueError):  # killed or crashed before its first save
        rec = {"backend": name}
    rec = finish_record(rec, returncode, timed_out, timeout_s, log_path)
    rec["wall_s"] = round(time.monotonic() - t, 1)
    if rec["error"]:
        print(tail(log_path), file=sys.stderr, flush=True)
    return rec


def print_plan(args, cfg: dict, model_dir: Path, out_path: Path) -> None:
    """--dry-run: the plan, and the synthetic model as vLLM parses it (no GPU needed)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        facts = check_model_config(model_dir, cfg["max_model_len"])
    except ImportError as exc:
        facts = f"not checked, vLLM is not importable ({exc})"
    shown = {**cfg, "model": {k: v for k, v in cfg["model"].items() if k != "config_json"}}
    print(json.dumps({"plan": shown, "model_as_vllm_sees_it": facts}, indent=1))
    for name in args.backend_list:
        b = BACKENDS[name]
        env = "VLLM_FLASHMLA_DISABLE=" + (b.plugin_env or "<unset>")
        print(f"{name:9s} attention_config.backend={b.attention_backend:15s} {env:28s} must run {b.impl_class}")
    print(
        f"{len(args.backend_list) * args.rounds} worker process(es), each ~1-2 min (estimate: imports, "
        f"torch.compile, graph capture, prefill of {args.batch * args.context} tokens); whole run capped at "
        f"{args.time_budget:.0f} s, {args.worker_timeout:.0f} s per worker"
    )
    print(f"results -> {out_path}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker))  # exits
    if args.markdown:
        for path in args.markdown:
            print(f"{path}:\n\n{markdown(json.loads(Path(path).read_text()))}\n")
        return 0

    t_start = time.monotonic()
    cfg = plan(args)
    smi = nvidia_smi(NVSMI_FIELDS)
    gpu = smi.get("name") if smi else None
    out_path = Path(args.out) if args.out else default_results_path("e2e", gpu)

    def say_parent(msg: str) -> None:
        print(f"[{time.monotonic() - t_start:6.1f}s] {msg}", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench_e2e_model_") as model_tmp:
        model_dir = Path(model_tmp)
        cfg["model"]["config_json"] = write_model_dir(
            model_dir, args.heads, args.layers, args.hidden_size, cfg["max_model_len"]
        )
        if args.dry_run:
            print_plan(args, cfg, model_dir, out_path)
            return 0

        log_dir = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="bench_e2e_logs_"))
        log_dir.mkdir(parents=True, exist_ok=True)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        git_commit, git_dirty = git_state()
        doc = {
            "benchmark": "bench_e2e",
            "gpu": gpu,
            "device": None,
            "nvidia_smi": smi,
            "versions": {
                "torch": package_version("torch"),
                "vllm": package_version("vllm"),
                "python": platform.python_version(),
            },
            "git_commit": git_commit,
            "git_dirty": git_dirty,
            "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config": cfg,
            "method": METHOD,
            "complete": False,
            "results": [],
            "summary": {},
        }
        write_json(out_path, doc)
        say_parent(
            f"{gpu or 'unknown GPU'} | {cfg['batch']} x {cfg['context']} tokens, h_q {args.heads}, "
            f"{args.layers} layers | -> {out_path} | logs in {log_dir}"
        )

        runs = run_order(args.backend_list, args.rounds)
        for i, (rnd, name) in enumerate(runs, 1):
            label = name if args.rounds == 1 else f"{name}#{rnd + 1}"
            remaining = args.time_budget - (time.monotonic() - t_start)
            timeout_s = min(args.worker_timeout, remaining)
            if timeout_s < MIN_WORKER_S:
                rec = {"backend": name, "error": f"skipped: {remaining:.0f} s left of the time budget"}
            else:
                say_parent(f"[{i}/{len(runs)}] {label}: worker started (timeout {timeout_s:.0f} s, log dir {log_dir})")
                rec = run_backend(name, label, cfg, args, model_dir, log_dir, timeout_s, say_parent)
            rec["round"] = rnd + 1
            rec.setdefault("error", None)
            if doc["device"] is None and rec.get("device"):
                doc["device"] = rec["device"]
                doc["gpu"] = doc["gpu"] or rec["device"]["name"]
                doc["versions"].update(rec.get("versions", {}))
            doc["results"].append(rec)
            doc["summary"] = summarize(doc["results"])
            write_json(out_path, doc)
            say_parent(f"[{i}/{len(runs)}] {label}: {record_line(rec)}")
            for line in kernel_lines(rec):
                print(line, flush=True)

    doc["complete"] = True
    doc["wall_s"] = round(time.monotonic() - t_start, 1)
    doc["nvidia_smi_after"] = nvidia_smi(NVSMI_FIELDS)
    write_json(out_path, doc)
    print(f"\nwrote {out_path} ({doc['wall_s']} s)\n")
    print(table(doc["summary"], args.backend_list))
    print(
        "\nvs ours = tokens/s of the backend / tokens/s of ours (medians over windows); the range pairs "
        "extreme windows. attn/GPU: attention share of GPU time; attn/step and GPU/step: of the step time."
    )
    return 1 if any(r["error"] for r in doc["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())
