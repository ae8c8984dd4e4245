"""The Python mirror of the scheduler record and constants agrees with the compiled extension."""

import pytest

from vllm_flashmla import _layout


def test_python_constants_are_consistent():
    assert _layout.D_QK == _layout.D_V + _layout.D_ROPE == 576
    assert _layout.SCHED_RECORD_INTS == 8


def test_extension_layout_matches_python():
    import torch  # the extension links against torch's libraries: load them first

    pytest.importorskip("flashmla_kernels", reason="extension not built")
    _layout.check_against_extension(torch.ops.flashmla_kernels.layout_info())


def test_mismatch_is_reported():
    with pytest.raises(RuntimeError, match="Rebuild the extension"):
        _layout.check_against_extension([32, 0, 4, 8, 12, 16, 4, 576, 512, 64])
