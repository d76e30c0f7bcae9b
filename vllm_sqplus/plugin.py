"""vLLM general-plugin entry point (group `vllm.general_plugins`): registers `smoothquant_plus`.

Loaded in every vLLM process, possibly more than once: register() is idempotent. All vLLM
imports live in vllm_sqplus/vllm_compat.py.
"""
_REGISTERED = False


def register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from vllm_sqplus import vllm_compat
    vllm_compat.register_quantization()
    _REGISTERED = True
