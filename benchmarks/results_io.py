"""Result files and environment facts shared by bench_decode.py and bench_e2e.py (pure Python, no torch)."""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import subprocess
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent


def json_safe(value):
    """NaN/inf floats become null so the results files are strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def write_json(path: str | Path, doc: dict) -> None:
    """doc as strict JSON, replacing path atomically: a run killed mid-write keeps the previous file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(json_safe(doc), indent=1) + "\n")
    os.replace(tmp, path)


def run_cmd(cmd: list[str]) -> str | None:
    """stdout of cmd run in the repository root, or None if it fails or is missing."""
    try:
        return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def git_state() -> tuple[str, bool | None]:
    """(commit, dirty) of the benchmarked tree; dirty is None when it cannot be known. The GPU host gets
    a copy of the tree that is not a checkout of this repository, so the caller passes the commit it
    benchmarks in BENCH_GIT_COMMIT, and what git answers there is not about this tree unless its HEAD is
    that commit."""
    head = run_cmd(["git", "rev-parse", "HEAD"])
    commit = os.environ.get("BENCH_GIT_COMMIT") or head or "unknown"
    if head is None or head != commit:
        return commit, None
    dirty = run_cmd(["git", "status", "--porcelain", "--untracked-files=no"])
    return commit, (bool(dirty) if dirty is not None else None)


def nvidia_smi(fields: list[str], gpu_uuid: str | None = None) -> dict | None:
    """nvidia-smi's `fields` of the GPU with gpu_uuid (the first GPU if none is given or it is not
    recognised); {"raw": text} if the answer does not split into the fields, None without nvidia-smi."""
    cmd = ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"]
    text = None
    if gpu_uuid:
        text = run_cmd([*cmd, "-i", gpu_uuid if gpu_uuid.startswith("GPU-") else f"GPU-{gpu_uuid}"])
    text = text or run_cmd(cmd)
    if not text:
        return None
    values = [v.strip() for v in text.splitlines()[0].split(",")]
    return dict(zip(fields, values, strict=True)) if len(values) == len(fields) else {"raw": text}


def default_results_path(kind: str, gpu: str | None) -> Path:
    """benchmarks/results/<kind>_<gpu slug>_<UTC time>.json"""
    slug = re.sub(r"[^a-z0-9]+", "-", (gpu or "gpu").lower()).strip("-") or "gpu"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return BENCH_DIR / "results" / f"{kind}_{slug}_{stamp}.json"
