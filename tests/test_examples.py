"""The example scripts import cleanly (their GPU paths need a Hopper GPU; see README): a renamed or
moved name they import fails here, on the CPU, instead of in front of a user."""

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.py"))


def test_examples_exist():
    assert {p.name for p in EXAMPLES} >= {"kernel_call.py", "offline_generate.py", "serve_client.py"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_imports(path):
    spec = importlib.util.spec_from_file_location(f"example_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # runs the imports; main() is behind `if __name__ == "__main__"`
    assert callable(module.main)
