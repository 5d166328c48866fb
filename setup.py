"""Build of glmix-kernels: the Python package and its C++ extension ``glmix_kernels._C``.

The extension is compiled against the torch already installed, so build without isolation:

    pip install --no-build-isolation .        # or: pip install --no-build-isolation -e .
    pip wheel --no-build-isolation .          # with a CUDA torch and nvcc: a wheel with the GPU kernels
    python setup.py build_ext --inplace       # quick rebuild while developing

What gets built:
- csrc/glmix_kernels.cpp + csrc/queries.cpp + csrc/cpu/*.cpp (CppExtension, -O3, OpenMP): the "cpu" backend, on any
  machine with a C++ compiler. Without one the package installs pure Python, and imports with the
  "reference" (and "triton") backends only.
- plus csrc/cuda/*.cu (CUDAExtension, -DWITH_CUDA): the "cuda" backend, when torch is a CUDA build
  and nvcc is found (under CUDA_HOME), or when forced.

Environment knobs:
  GLMIX_SKIP_EXT=1        pure-Python install, no C++ at all
  GLMIX_FORCE_CUDA=1      build the CUDA kernels even when detection says no (e.g. no GPU on the
                          build machine); fails if torch or the toolkit cannot do it
  GLMIX_CUDA_ARCH         GPU architectures, e.g. "9.0" or "8.0;9.0+PTX"; default
                          TORCH_CUDA_ARCH_LIST, then the local GPU's capability (torch's rule)
  MAX_JOBS                parallel compile jobs (torch's ninja build reads it)
  NVCC_THREADS            nvcc --threads (parallel compilation for several architectures)
  GLMIX_CUDA_EMULATION=1  also build the CUDA kernels for CPU tensors under the host emulation of
                          the CUDA execution model (backend "cuda_emulated", docs/emulation.md);
                          any torch, no toolkit needed
  GLMIX_EXTRA_INCLUDE     extra include directories, separated by os.pathsep, searched after
                          the compilers' own (-idirafter for the C++ compiler, and for nvcc's host
                          compiler through -Xcompiler); e.g. a pip wheel's nvidia/cu13/include
                          when the local toolkit lacks headers torch includes (docs/building.md)
"""

import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _version():
    with open(os.path.join(ROOT, "glmix_kernels", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def _flag(name):
    return os.environ.get(name, "") == "1"


def _sources(pattern):
    # Relative paths: setuptools rejects absolute ones in editable and wheel builds.
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extensions():
    """(ext_modules, cmdclass, torch requirement) for this machine, or none when skipped."""
    if _flag("GLMIX_SKIP_EXT"):
        return [], {}, "torch>=2.4"
    if not shutil.which(os.environ.get("CXX", "c++")):
        print("glmix-kernels: no C++ compiler found, installing without the C++ extension", file=sys.stderr)
        return [], {}, "torch>=2.4"
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        raise SystemExit(
            f"glmix-kernels: building the extension needs torch installed first ({e}); "
            "install with `pip install --no-build-isolation .`, or set GLMIX_SKIP_EXT=1"
        ) from e

    cuda_sources = _sources("csrc/cuda/*.cu")
    nvcc = cpp_extension.CUDA_HOME and os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    with_cuda = _flag("GLMIX_FORCE_CUDA") or (
        torch.version.cuda is not None and bool(nvcc) and os.path.exists(nvcc) and bool(cuda_sources)
    )
    if with_cuda and not cuda_sources:
        raise SystemExit("glmix-kernels: GLMIX_FORCE_CUDA=1 but there are no csrc/cuda/*.cu sources")

    include = [d for d in os.environ.get("GLMIX_EXTRA_INCLUDE", "").split(os.pathsep) if d]
    if sys.platform == "win32":
        cxx, link = ["/O2", "/openmp"], []
    elif sys.platform == "darwin":  # Apple clang has no -fopenmp: at::parallel_for then runs serially
        cxx, link = ["-O3", "-fno-trapping-math", "-fno-math-errno"], []
    else:
        # No trapping math (as torch builds itself): lets the compiler vectorise the kernels' loops
        # with selects and clamps (the branch-free exp in csrc/cpu/tile.h).
        cxx, link = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"], ["-fopenmp"]
    cxx += [f for d in include for f in ("-idirafter", d)]
    kwargs = dict(
        name="glmix_kernels._C",
        sources=_sources("csrc/glmix_kernels.cpp") + _sources("csrc/queries.cpp") + _sources("csrc/cpu/*.cpp"),
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=[("GLMIX_PYTHON_MODULE", None)],
        extra_link_args=link,
    )
    if _flag("GLMIX_CUDA_EMULATION"):
        kwargs["sources"] += _sources("csrc/cuda/emulated/*.cpp") + _sources("csrc/cuda/emulation*.cpp")
        kwargs["define_macros"] += [("WITH_CUDA_EMULATION", None)]
    if with_cuda:
        if os.environ.get("GLMIX_CUDA_ARCH"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ["GLMIX_CUDA_ARCH"]
        nvcc_flags = ["-O3"] + [f for d in include for f in ("-Xcompiler", "-idirafter", "-Xcompiler", d)]
        if os.environ.get("NVCC_THREADS"):
            nvcc_flags += ["--threads", os.environ["NVCC_THREADS"]]
        kwargs["sources"] += cuda_sources
        kwargs["define_macros"] += [("WITH_CUDA", None)]
        ext = cpp_extension.CUDAExtension(**kwargs, extra_compile_args={"cxx": cxx, "nvcc": nvcc_flags})
    else:
        ext = cpp_extension.CppExtension(**kwargs, extra_compile_args={"cxx": cxx})
    print(
        f"glmix-kernels: building glmix_kernels._C for torch {torch.__version__}, "
        f"{'CPU and CUDA' if with_cuda else 'CPU only'}"
        f"{', with the CUDA emulation' if _flag('GLMIX_CUDA_EMULATION') else ''}",
        file=sys.stderr,
    )
    # The extension links against this torch's C++ ABI: pin the release it was built with.
    return [ext], {"build_ext": cpp_extension.BuildExtension}, f"torch=={torch.__version__.split('+')[0]}"


ext_modules, cmdclass, torch_requirement = _extensions()

# The metadata is in pyproject.toml's [project] table; the two fields it leaves dynamic come from here.
setup(
    version=_version(),
    packages=find_packages(include=["glmix_kernels", "glmix_kernels.*"]),
    install_requires=[torch_requirement],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
