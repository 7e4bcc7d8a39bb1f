"""Build fastdiffinst and its native extension ``fastdiffinst._C``.

CUDA kernels are compiled when a CUDA toolkit and a CUDA build of torch are present (a GPU is not
needed: CI compiles the ``.cu`` files without one); CPU-only otherwise. Environment switches:

* ``FORCE_CUDA=1`` / ``FORCE_CUDA=0``: build the CUDA kernels / never build them.
* ``TORCH_CUDA_ARCH_LIST``: defaults to ``9.0`` (H100/H200) when no GPU is visible, because
  torch cannot detect an architecture without a device.
* ``CUDA_HOME``: ``/usr/local/cuda`` when unset and ``nvcc`` lives there, else the toolkit of the
  ``nvcc`` on ``PATH``.
* ``DEBUG=1``: ``-O0 -g``.
* ``NVCC_FLAGS``: extra nvcc flags.

Both compilers are told ``-std=c++20`` (csrc/ uses designated initialisers), whatever the
installed torch would add by default (torch 2.14 adds C++20, older releases C++17).

Build with ``pip install -e . --no-build-isolation`` (torch must already be installed).
"""

import glob
import os
import re
import shutil

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_home():
    """CUDA_HOME (or CUDA_PATH), else /usr/local/cuda, else the toolkit of the nvcc on PATH."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home
    nvcc = "/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else shutil.which("nvcc")
    if nvcc is None:
        return None
    os.environ["CUDA_HOME"] = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return os.environ["CUDA_HOME"]


def _want_cuda(torch):
    force = os.environ.get("FORCE_CUDA")
    if force is not None and force.strip() not in ("", "0", "1"):
        raise SystemExit(f"FORCE_CUDA must be 0 or 1, got {force!r}")
    if force == "0":
        return False
    has_toolkit = _cuda_home() is not None
    if force == "1":
        if not has_toolkit:
            raise SystemExit("FORCE_CUDA=1 but no CUDA toolkit was found; set CUDA_HOME")
        if torch.version.cuda is None:
            raise SystemExit("FORCE_CUDA=1 but the installed torch is not a CUDA build")
        return True
    return has_toolkit and torch.version.cuda is not None


def extensions():
    # CUDA_HOME must be settled before torch.utils.cpp_extension reads it at import.
    _cuda_home()
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    with_cuda = _want_cuda(torch)
    debug = os.environ.get("DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "ops", "*.cpp")))
    std = "-std=c++20"
    cxx = opt + [std, "-fopenmp"]
    define_macros = []
    kwargs = {}
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
        sources += sorted(glob.glob(os.path.join("csrc", "ops", "cuda", "*.cu")))
        define_macros.append(("WITH_CUDA", None))
        nvcc = (["-O0", "-g", "-lineinfo"] if debug else ["-O3"]) + ["--expt-relaxed-constexpr"]
        user_flags = os.environ.get("NVCC_FLAGS", "").split()
        # nvcc takes one -std: a user's own wins.
        nvcc += ([] if any(f.startswith(("-std", "--std")) for f in user_flags) else [std]) + user_flags
        kwargs["extra_compile_args"] = {"cxx": cxx, "nvcc": nvcc}
        ext_cls = CUDAExtension
    else:
        kwargs["extra_compile_args"] = {"cxx": cxx}
        ext_cls = CppExtension
    return [
        ext_cls(
            "fastdiffinst._C",
            sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            define_macros=define_macros,
            extra_link_args=["-fopenmp"],
            **kwargs,
        )
    ]


def cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True, use_ninja=True)}


def version():
    """``__version__`` of fastdiffinst/__init__.py, read without importing the package (torch)."""
    with open(os.path.join(HERE, "fastdiffinst", "__init__.py"), encoding="utf-8") as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


setup(
    name="fastdiffinst",
    version=version(),
    license="Apache-2.0",
    description="Fast, trainable DiffusionInst on fused RoIAlign, dynamic-mask-head and box-diffusion kernels",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fastdiffinst", "fastdiffinst.*"]) + ["fastdiffinst.kernels"],
    package_dir={"fastdiffinst.kernels": "kernels"},
    package_data={"fastdiffinst.zoo": ["*.pth", "*.json"]},  # the shipped models' weights and cards
    install_requires=["torch>=2.11", "numpy>=1.24"],
    extras_require={
        "vision": ["torchvision>=0.26"],
        "data": ["pycocotools>=2.0.7", "pillow>=10", "pyyaml>=6"],
        "lvis": ["lvis>=0.5.3"],
        "extra": ["tqdm>=4.66", "matplotlib>=3.8"],
        "test": ["pytest>=8", "pytest-benchmark>=4", "torchvision>=0.26"],
    },
    entry_points={"console_scripts": ["fastdiffinst = fastdiffinst.cli:console_main"]},
    ext_modules=extensions(),
    cmdclass=cmdclass(),
    zip_safe=False,
)
