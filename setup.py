"""Packaging for ds_conadv: the parts that need code. The metadata, dependencies and extras are in pyproject.toml.

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
    version=_version(),
    long_description=_long_description,
    long_description_content_type="text/markdown",
    packages=_packages,
    package_dir=_package_dir,
    # CUDA/C++ sources ship with every kernels package (JIT-built at run time).
    package_data={**{name: KERNEL_SOURCES for name in _kpkgs + ["ds_conadv.kernels.cuda"]},
                  "ds_conadv": ["configs/*.json", "py.typed"]},  # the embedded configs; PEP 561 marker
    ext_modules=_ext_modules,
    cmdclass=_cmdclass,
)
