"""What a benchmark record says about the tree it measured (benchmarks/results_io.py)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import results_io  # noqa: E402

HEAD = results_io.run_cmd(["git", "rev-parse", "HEAD"])


@pytest.mark.skipif(HEAD is None, reason="needs a git checkout")
def test_git_state_of_this_checkout(monkeypatch):
    monkeypatch.delenv("BENCH_GIT_COMMIT", raising=False)
    commit, dirty = results_io.git_state()
    assert commit == HEAD
    assert isinstance(dirty, bool)
    monkeypatch.setenv("BENCH_GIT_COMMIT", commit)
    assert results_io.git_state() == (commit, dirty)


def test_named_commit_of_another_tree_has_unknown_dirtiness(monkeypatch):
    # The GPU host benchmarks a copy of the tree that is not a checkout of this repository.
    other = "0" * 40
    monkeypatch.setenv("BENCH_GIT_COMMIT", other)
    assert results_io.git_state() == (other, None)
