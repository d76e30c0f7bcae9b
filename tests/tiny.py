"""Tiny random checkpoints built inside the tests (no downloads): Llama, Mistral-style GQA, Qwen2.

Weights get a few large input channels on purpose (activation outliers), so smoothing has
something to do and a wrong fold shows up in the logits.
"""
from __future__ import annotations

from pathlib import Path

import torch

CODE = ("def add(a, b):\n    return a + b\n\nclass Stack:\n    def __init__(self):\n        self.items = []\n"
        "    def push(self, x):\n        self.items.append(x)\n\nfor i in range(10):\n    print(i * i)\n")


def tiny_tokenizer(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CODE] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", bos_token="<|endoftext|>")


def tiny_config(arch: str = "llama", hidden: int = 128, layers: int = 2, heads: int = 4,
                kv_heads: int | None = None, intermediate: int = 256, vocab: int = 320, tie: bool = False):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[arch]
    cfg = cls(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv_heads or heads, vocab_size=vocab,
              max_position_embeddings=1024, tie_word_embeddings=tie, eos_token_id=0, bos_token_id=0,
              pad_token_id=0)
    cfg.architectures = [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                          "qwen2": "Qwen2ForCausalLM"}[arch]]
    return cfg


def tiny_model(arch: str = "llama", seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **kw), dtype=torch.float32,
                                             attn_implementation="sdpa")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.02)
        # outlier input channels: a few embedding dimensions carry large values
        emb = model.get_input_embeddings().weight
        emb[:, :3] *= 20
    return model.eval()


def save_tiny(path: Path, arch: str = "llama", dtype=torch.float32, **kw) -> Path:
    model = tiny_model(arch, **kw).to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(path, safe_serialization=True)
    tiny_tokenizer().save_pretrained(path)
    return path


@torch.no_grad()
def fake_quantize_model(model, group_size: int = 128, zero_point: bool = True,
                        match: str = ".layers.") -> int:
    """The ground truth of what smoothquant_plus serves: every nn.Linear whose name contains
    `match` (the decoder linears; lm_head and embeddings kept) gets
    dequantize_int4(quantize_int4(w)) in place, in the weight's dtype. Returns how many."""
    from vllm_sqplus.quant import dequantize_int4, quantize_int4
    n = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and match in name:
            q, s, z = quantize_int4(mod.weight, group_size, zero_point, name=name)
            mod.weight.copy_(dequantize_int4(q, s, z, group_size, torch.float32))
            n += 1
    assert n, f"fake_quantize_model: no nn.Linear named like '*{match}*'"
    return n


@torch.no_grad()
def greedy_tokens(model, prompts: list[list[int]], n_new: int) -> list[list[int]]:
    """transformers greedy decoding with the KV cache: n_new tokens per prompt (the reference the
    vLLM tests compare the engine's tokens with)."""
    outs = []
    for p in prompts:
        ids, past, new = torch.tensor([p]), None, []
        for _ in range(n_new):
            out = model(ids, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, int(out.logits[0, -1].argmax())
            new.append(nxt)
            ids = torch.tensor([[nxt]])
        outs.append(new)
    return outs
