"""bench_e2e.py --markdown (no GPU, no vLLM): the README's end-to-end table from a results file."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_e2e  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "e2e_h200_2026-12-02T1312_h128.json"


def test_markdown_rows_come_from_the_file():
    doc = json.loads(RESULTS.read_text())
    lines = bench_e2e.markdown(doc).splitlines()
    assert lines[0].startswith("| backend | tokens/s") and len(lines) == 2 + len(doc["config"]["backends"])
    ours, fa3 = lines[2], lines[4]
    assert ours.startswith("| ours (FLASHMLA via this plugin) | 9810 [9806, 9842] | 3.26 | 1900 | 1073 | 58% | 1.000x |")
    assert fa3.startswith("| vLLM FLASH_ATTN_MLA | 14614 [14212, 15604] | 2.19 | 1858 | 1130 | 85% | 1.490x |")


def test_a_failed_backend_keeps_its_row():
    doc = json.loads(RESULTS.read_text())
    doc["results"] = [r if r["backend"] != "triton" else {**r, "error": "timed out", "windows": None} for r in doc["results"]]
    assert bench_e2e.markdown(doc).splitlines()[-1] == "| vLLM TRITON_MLA | failed | | | | | |"


def test_markdown_mode_needs_no_gpu(capsys):
    assert bench_e2e.main(["--markdown", str(RESULTS)]) == 0
    assert "| vLLM FLASHMLA | 9621 [9606, 9691] |" in capsys.readouterr().out


def test_markdown_needs_a_file():
    with pytest.raises(SystemExit):
        bench_e2e.parse_args(["--markdown"])


def test_kernel_summary_counts_steps_by_the_main_kernel_and_lists_top_n():
    # 2 layers x 3 steps of our decode + combine, with other kernels in between.
    step = [("vllm_flashmla::sm90::decode_kernel<...>", 100.0), ("vllm_flashmla::combine_kernel<...>", 10.0),
            ("nvjet_gemm", 40.0), ("triton_red_fused_4", 5.0)]
    s = bench_e2e.summarize_kernels(step * 2 * 3, num_layers=2, expected="ours", top_n=3)
    assert s["error"] is None and s["profiled_steps"] == 3
    assert s["gpu_us_per_step"] == 310.0 and s["attention_us_per_step"] == 220.0
    assert [k["name"] for k in s["top_kernels"]] == [step[0][0], step[2][0], step[1][0]]
    assert s["top_kernels"][0]["calls_per_step"] == 2
    missing = bench_e2e.summarize_kernels(step[2:] * 4, num_layers=2, expected="ours")
    assert "profiled_steps" not in missing and missing["error"].startswith("no decode_kernel kernel of ours")


def test_host_ops_are_self_time_per_step_largest_first():
    ops = [("cudaGraphLaunch", 30.0), ("aten::copy_", 5.0), ("cudaStreamSynchronize", 400.0)] * 4
    top = bench_e2e.summarize_host_ops(ops, steps=4, top_n=2)
    assert top == [{"name": "cudaStreamSynchronize", "self_us_per_step": 400.0, "calls_per_step": 1.0},
                   {"name": "cudaGraphLaunch", "self_us_per_step": 30.0, "calls_per_step": 1.0}]


def test_thread_cpu_report_from_proc_stat_lines():
    fields = ["S"] + ["0"] * 49  # proc(5) fields 3 on; utime is field 14, stime 15, processor 39
    fields[14 - 3], fields[15 - 3], fields[39 - 3] = "700", "50", "3"
    line = "4242 (pt_main (x) y) " + " ".join(fields)
    assert bench_e2e.parse_task_stat(line) == ("pt_main (x) y", 750, 3)
    before = {1: ("main", 100, 0), 2: ("spin", 0, 5)}
    after = {1: ("main", 150, 1), 2: ("spin", 200, 5), 3: ("new", 10, 2)}
    rows = bench_e2e.thread_cpu_report(before, after, wall_s=2.0, ticks_per_s=100, top_n=2)
    assert rows == [{"tid": 2, "name": "spin", "cpu_s": 2.0, "share": 1.0, "last_cpu": 5},
                    {"tid": 1, "name": "main", "cpu_s": 0.5, "share": 0.25, "last_cpu": 1}]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="Linux /proc")
def test_thread_cpu_snapshot_sees_this_thread():
    snap = bench_e2e.thread_cpu_snapshot()
    assert snap and all(isinstance(name, str) and ticks >= 0 for name, ticks, _ in snap.values())
    assert bench_e2e.host_facts()["cpu_count"] >= 1


def test_host_probe_times_its_loop():
    # 16x the iterations: a probe that timed nothing, or the wrong thing, would not scale with them.
    short, long = bench_e2e.host_probe_ms(25_000), bench_e2e.host_probe_ms(400_000)
    assert 0 < short and long > 2 * short


def test_rounds_alternate_which_backend_runs_first():
    assert bench_e2e.run_order(["ours", "fa3mla"], 3) == [
        (0, "ours"), (0, "fa3mla"), (1, "fa3mla"), (1, "ours"), (2, "ours"), (2, "fa3mla")]
    args = bench_e2e.parse_args(["--dry-run", "--backends", "ours,fa3mla", "--rounds", "2"])
    assert bench_e2e.plan(args)["run_order"] == ["ours#1", "fa3mla#1", "fa3mla#2", "ours#2"]


def test_top_kernels_option_reaches_the_plan():
    args = bench_e2e.parse_args(["--dry-run", "--top-kernels", "60"])
    assert bench_e2e.plan(args)["top_kernels"] == 60
    with pytest.raises(SystemExit):
        bench_e2e.parse_args(["--dry-run", "--top-kernels", "0"])


def test_launch_facts_report_grid_streams_and_overlap_with_other_streams():
    def kernel(name, ts, dur, stream, grid=(4, 1, 1)):
        return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur,
                "args": {"stream": stream, "grid": list(grid), "block": [128, 1, 1]}}
    trace = [
        kernel("triton_red_fused_4", 0, 10, 7), kernel("triton_red_fused_4", 100, 10, 7, grid=(8, 1, 1)),
        kernel("triton_red_fused_4", 200, 10, 7), kernel("side", 205, 50, 9),  # overlaps the third launch
        kernel("alone", 300, 5, 7), {"ph": "X", "cat": "cpu_op", "name": "alone", "ts": 0, "dur": 999},
    ]
    facts = bench_e2e.launch_facts(trace, ["triton_red_fused_4", "alone", "never_ran"])
    assert facts["triton_red_fused_4"] == {"grid": [4, 1, 1], "block": [128, 1, 1], "streams": ["7"],
                                           "overlapped": round(1 / 3, 3)}
    assert facts["alone"]["overlapped"] == 0 and "never_ran" not in facts


def test_fresh_compile_gives_the_worker_its_own_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_CACHE_ROOT", "/shared/cache")
    backend = bench_e2e.BACKENDS["ours"]
    assert bench_e2e.worker_env(backend)["VLLM_CACHE_ROOT"] == "/shared/cache"
    env = bench_e2e.worker_env(backend, tmp_path)
    assert {env[v] for v in bench_e2e.COMPILE_CACHE_VARS} == {str(tmp_path / v.lower()) for v in bench_e2e.COMPILE_CACHE_VARS}
    assert bench_e2e.plan(bench_e2e.parse_args(["--dry-run", "--fresh-compile"]))["fresh_compile"] is True
