"""Builds the CUDA extension `flashmla_kernels` (sm90a only).

Build without isolation so the extension compiles against the torch that vLLM pinned (see README):
    pip install --no-build-isolation -e .
"""

import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def cutlass_include_dirs() -> list[str]:
    """CUTLASS/CuTe headers ship in the `nvidia-cutlass` wheel, under cutlass_library/source."""
    try:
        import cutlass_library
    except ImportError as exc:
        raise RuntimeError(
            "vllm-flashmla needs the CUTLASS headers from the `nvidia-cutlass` package at build time. "
            "Install it first (pip install nvidia-cutlass==4.2.0.0), then build with --no-build-isolation."
        ) from exc
    source = Path(cutlass_library.__file__).resolve().parent / "source"
    dirs = [source / "include", source / "tools" / "util" / "include"]
    if not (dirs[0] / "cute" / "tensor.hpp").is_file():
        raise RuntimeError(f"nvidia-cutlass is installed but {dirs[0]}/cute/tensor.hpp is missing; reinstall it.")
    return [str(d) for d in dirs]


def extension_modules():
    from torch.utils.cpp_extension import CUDAExtension

    # torch.utils.cpp_extension guesses CUDA_HOME from `which nvcc`; point it at the real toolkit.
    os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")
    # With no GPU present torch cannot infer the arch; sm90a is the only target anyway.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
    sources = [
        "csrc/torch_binding.cpp",  # op schemas and argument checks (the only file that sees torch)
        "csrc/scheduler.cu",  # get_mla_metadata
        "csrc/decode.cu",  # dtype dispatch: decode kernel, then combine
        "csrc/combine.cu",  # LSE merge of split requests
        "csrc/sm90/decode_bf16.cu",  # decode kernel instantiations, one per input type
        "csrc/sm90/decode_fp16.cu",
    ]
    nvcc_flags = [
        "-O3",
        "-std=c++17",
        "-gencode=arch=compute_90a,code=sm_90a",
        "--use_fast_math",
        "--expt-relaxed-constexpr",
        "-lineinfo",
        "-Xptxas=-warn-spills",
        # torch disables the bf16/half operators by default; CUTLASS numeric types need them.
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-U__CUDA_NO_HALF2_OPERATORS__",
    ]
    return [
        CUDAExtension(
            name="flashmla_kernels",
            sources=sources,
            include_dirs=[str(ROOT / "csrc"), *cutlass_include_dirs()],
            extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": nvcc_flags},
        )
    ]


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(ext_modules=extension_modules(), cmdclass={"build_ext": build_ext_class()})
