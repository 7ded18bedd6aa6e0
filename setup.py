"""Packaging for ds_conadv.

The top-level ``kernels/`` directory is installed as the subpackage
``ds_conadv.kernels`` (never as a bare top-level ``kernels`` module), together
with every subpackage under it (``ds_conadv.kernels.triton``,
``ds_conadv.kernels.cuda``, ...) and the CUDA sources in ``kernels/cuda``.

Install torch first (``pip install torch==2.13.0``): an unpinned torch
requirement resolved before that can pull the CUDA wheels.
"""
import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _version():
    with open(os.path.join(HERE, "ds_conadv", "__init__.py"), encoding="utf-8") as f:
        m = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', f.read(), re.M)
    return m.group(1) if m else "0.0.0"


def _kernel_packages():
    """``ds_conadv.kernels`` plus every directory below kernels/ that holds code.

    A directory counts when it has an ``__init__.py`` or CUDA/C++ sources
    (so ``kernels/cuda`` is packaged even before it gets an ``__init__.py``).
    """
    root = os.path.join(HERE, "kernels")
    pkgs = ["ds_conadv.kernels"]
    if not os.path.isdir(root):
        return pkgs, {}
    dirs = {"ds_conadv.kernels": "kernels"}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__pycache__")))
        rel = os.path.relpath(dirpath, root)
        if rel == ".":
            continue
        has_code = "__init__.py" in filenames or any(
            f.endswith((".py", ".cu", ".cuh", ".cpp", ".h")) for f in filenames)
        if has_code:
            name = "ds_conadv.kernels." + rel.replace(os.sep, ".")
            pkgs.append(name)
            dirs[name] = "kernels/" + rel.replace(os.sep, "/")
    return pkgs, dirs


_kpkgs, _kdirs = _kernel_packages()
_packages = find_packages(include=["ds_conadv", "ds_conadv.*"]) + _kpkgs
_package_dir = {"ds_conadv.kernels": "kernels"}
_package_dir.update(_kdirs)

_readme = os.path.join(HERE, "README.md")
_long_description = open(_readme, encoding="utf-8").read() if os.path.exists(_readme) else ""

TRITON = "triton==3.7.1"
# The DeepSpeed releases the integration supports (ds_conadv/integrations/deepspeed/compat.py SUPPORTED; checked at
# import, tested in CI with the oldest, scripts/test_deepspeed_oldest.sh, and the pinned newest).
DEEPSPEED_RANGE = "deepspeed>=0.16.9,<0.20"
# the test pin (the newest supported); its torch requirement is met by the torch installed first
DEEPSPEED = "deepspeed==0.19.8"
# ds_conadv/integrations/horovod/compat.py SUPPORTED
HOROVOD_RANGE = "horovod>=0.28.1,<0.29"
KERNEL_SOURCES = ["*.cu", "*.cuh", "*.cpp", "*.h"]


def _cuda_extension():
    """With DS_CONADV_BUILD_CUDA=1, compile the CUDA kernels at install into ds_conadv.kernels.cuda._dsc_ext
    (which the backend imports before trying its JIT build). Needs a CUDA build of torch and nvcc; install with
    ``pip install --no-build-isolation`` so the build sees that torch."""
    if os.environ.get("DS_CONADV_BUILD_CUDA", "0") != "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    if torch.version.cuda is None:
        raise SystemExit(f"DS_CONADV_BUILD_CUDA=1 needs a CUDA build of torch; this one is {torch.__version__} "
                         "(the kernels still build on first use on a CUDA machine)")
    flags = ["-O3", "-std=c++17"]  # kernels/cuda/__init__.py EXTRA_CFLAGS / EXTRA_CUDA_CFLAGS
    ext = CUDAExtension("ds_conadv.kernels.cuda._dsc_ext",
                        ["kernels/cuda/dsc_binding.cpp", "kernels/cuda/dsc_kernels.cu"],
                        extra_compile_args={"cxx": flags, "nvcc": flags})
    return [ext], {"build_ext": BuildExtension}


_ext_modules, _cmdclass = _cuda_extension()

setup(
    name="ds_conadv",
    version=_version(),
    description=("Fused LAMB/LARS optimizers and ConAdv concurrent adversarial "
                 "large-batch training for DeepSpeed and Horovod"),
    long_description=_long_description,
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=_packages,
    package_dir=_package_dir,
    # CUDA/C++ sources ship with every kernels package (JIT-built at run time).
    package_data={**{name: KERNEL_SOURCES for name in _kpkgs + ["ds_conadv.kernels.cuda"]},
                  "ds_conadv": ["configs/*.json", "py.typed"]},  # the embedded configs; PEP 561 marker
    install_requires=[
        "torch>=2.1",
        "numpy",
        "pydantic>=2",
        "tqdm",
    ],
    extras_require={
        "triton": [TRITON],
        "deepspeed": [DEEPSPEED_RANGE],
        "test": ["pytest", "pytest-timeout", "scikit-learn", "matplotlib", TRITON, DEEPSPEED,
                 "tensorboard",  # DeepSpeed's "tensorboard" monitor section (tests/test_monitor.py)
                 # the HF Trainer / accelerate / Lightning routes (tests/test_hf.py, tests/test_lightning.py)
                 "transformers>=5,<6", "accelerate>=1.10,<2", "lightning>=2.5,<3"],
        # ruff (lint + format) and mypy on the library: scripts/lint.sh (run by scripts/test.sh)
        "lint": ["ruff==0.17.5", "mypy==2.4.1"],
        # timm requires torchvision, which is broken beside torch 2.13 here:
        # install it with `pip install --no-deps timm` (benchmarks load its
        # optim files directly, without importing the timm package).
        "bench": ["timm"],
        # Horovod builds from source against the installed torch: plain `pip install .[horovod]` fails (build
        # isolation hides torch; the sdist forces C++14, torch 2.13 needs C++17). Use
        # `bash scripts/install_horovod.sh` (C++17 compiler wrapper, --no-build-isolation, gloo, cached wheel),
        # or give pip the same flags it uses; see docs/horovod.md.
        "horovod": [HOROVOD_RANGE],
    },
    entry_points={"console_scripts": ["ds-conadv = ds_conadv.cli:console_main"]},
    ext_modules=_ext_modules,
    cmdclass=_cmdclass,
    zip_safe=False,
)
