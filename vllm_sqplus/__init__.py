"""vllm-sqplus: SmoothQuant+ (arXiv 2312.03788) 4-bit weight-only quantization for vLLM.

Pipeline, one file per stage:
  corpora.py    fixed calibration / evaluation texts from the standard library, disjoint
  calib.py      calibration text (stdlib default, HumanEval prompts, JSONL, plain text) -> token batches
  calibrate.py  per-input-channel statistics and input Gram blocks, one decoder layer at a time
  smooth.py     s = max|X|^a / max|W|^(1-a), folded into the preceding norm / linear
  search.py     whole-model alpha, per-layer refinement, clipping; chosen by the whole model's loss
  clip.py       clipping search, folded into the stored weights
  quant.py      reference group-wise INT4 (the ground truth of every kernel)
  config.py     the quantization_config (one reader, one writer) and the group-size rule
  export.py     `sqplus quantize`: pre-quantized INT4 checkpoints
  kernels/      W4A16 backends (reference, CPU, CUDA, vLLM's own: backends.py, vllm_mp.py) over the
                ops in csrc/, and the W4A16Linear module
  plugin.py     vLLM entry point; vllm_compat.py (and kernels/vllm_mp.py) hold every vLLM import
  hf.py         transformers quantizer (from_pretrained -> W4A16Linear), registered by hf_hook.py
"""
__version__ = "0.1.0"
QUANT_METHOD = "smoothquant_plus"

# transformers: register smoothquant_plus once transformers' quantizers load (stdlib only here:
# importing vllm_sqplus stays cheap and works without transformers)
try:
    from vllm_sqplus import hf_hook as _hf_hook
    _hf_hook.install()
except Exception:  # noqa: BLE001 - never fail the import of the package
    pass
