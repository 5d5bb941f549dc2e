"""Build the sara_kernels native extension (CPU always; CUDA when torch and a toolkit allow).

Install with the torch that is already in the environment:

    pip install --no-build-isolation .        # or -e .

Environment switches:
    SARA_KERNELS_NO_CUDA=1     build the CPU kernels only, even with a CUDA build of torch
    SARA_KERNELS_NO_NATIVE=1   build nothing native (the package then runs on reference/Triton)
    TORCH_CUDA_ARCH_LIST       CUDA targets (default "9.0", Hopper)
    CUDA_HOME                  the toolkit; when unset it is derived from the `nvcc` on the PATH,
                               following a wrapper script that execs the real nvcc
    MAX_JOBS                   parallel compile jobs (ninja)
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "off", "no")


def _cuda_home_from_nvcc() -> str | None:
    """The toolkit folder of the nvcc on the PATH (following a wrapper script that execs one)."""
    nvcc = shutil.which("nvcc")
    seen = set()
    while nvcc and nvcc not in seen:
        seen.add(nvcc)
        real = os.path.realpath(nvcc)
        try:
            with open(real, "rb") as f:
                head = f.read(4096)
        except OSError:
            return None
        if head.startswith(b"#!"):  # a wrapper: follow the nvcc it execs
            match = re.search(rb"([^\s'\"]+/bin/nvcc)\b", head[2:])
            if not match:
                return None
            nvcc = match.group(1).decode()
            continue
        return os.path.dirname(os.path.dirname(real))
    return None


if not os.environ.get("CUDA_HOME") and not _flag("SARA_KERNELS_NO_CUDA"):
    home = _cuda_home_from_nvcc()
    if home:
        os.environ["CUDA_HOME"] = home
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")

ext_modules = []
cmdclass = {}
if not _flag("SARA_KERNELS_NO_NATIVE"):
    import torch
    from torch.utils import cpp_extension

    cpu_sources = ["csrc/sara_kernels.cpp", "csrc/autograd.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    with_cuda = (
        torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and not _flag("SARA_KERNELS_NO_CUDA")
        and bool(cuda_sources)
    )
    cxx = ["-O3", "-fopenmp", "-DSARA_KERNELS_BUILD"]
    extra_link = ["-fopenmp"]
    if with_cuda:
        nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-DSARA_KERNELS_WITH_CUDA"]
        ext = cpp_extension.CUDAExtension(
            "sara_kernels._C",
            cpu_sources + cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx + ["-DSARA_KERNELS_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=extra_link,
            py_limited_api=False,
        )
    else:
        ext = cpp_extension.CppExtension(
            "sara_kernels._C",
            cpu_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=extra_link,
        )
    print(
        f"sara_kernels: building the native extension with {'CPU + CUDA' if with_cuda else 'CPU'} "
        f"kernels (torch {torch.__version__}, CUDA_HOME={cpp_extension.CUDA_HOME}, "
        f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')})",
        file=sys.stderr,
    )
    ext_modules = [ext]
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}

setup(
    packages=find_packages(include=["sara_kernels", "sara_kernels.*"]),
    package_data={"sara_kernels": ["py.typed"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
