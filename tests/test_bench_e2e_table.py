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
