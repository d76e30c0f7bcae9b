"""Run a Hugging Face causal LM one decoder layer at a time, and collect activation statistics.

Only one decoder layer's weights are on `device` at any moment (plus the embedding on the way in
and the final norm + lm_head on the way out), so a model larger than device memory can be
calibrated: the paper's 34B-on-one-40GB-GPU case. Layer i's outputs are layer i+1's inputs.

The keyword arguments each decoder layer needs (rotary position embeddings, masks, ...) are
captured from one real forward call (the "Catcher" pattern of GPTQ/AWQ), so this follows whatever
the installed transformers computes instead of re-deriving it.
"""
from __future__ import annotations

import copy
from typing import Iterator

import torch
from torch import nn

from vllm_sqplus.arch import ArchSpec, get_module
from vllm_sqplus.errors import SqplusError


class _Caught(Exception):
    pass


class LayerwiseModel:
    """A causal LM run layer by layer on `device` in `dtype` (float32 by default)."""

    def __init__(self, model: nn.Module, arch: ArchSpec, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, batch_size: int = 4):
        self.model, self.arch = model, arch
        self.device, self.dtype, self.batch_size = torch.device(device), dtype, batch_size
        self.layers = get_module(model, arch.layers)
        self._kwargs: dict | None = None
        self._seq_len: int | None = None

    # -- inputs ---------------------------------------------------------------------------------
    def _capture_kwargs(self, seq_len: int) -> dict:
        """Keyword arguments the first decoder layer receives for one sequence of seq_len tokens."""
        if self._kwargs is not None and self._seq_len == seq_len:
            return self._kwargs
        caught: dict = {}
        first = self.layers[0]

        class Catcher(nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner
                # some models read attributes of the layer (e.g. attention_type) before calling it
                self.__dict__.update({k: v for k, v in inner.__dict__.items() if not k.startswith("_")})

            def forward(self, hidden_states, *args, **kwargs):
                if args:
                    raise SqplusError("decoder layers called with positional extras; unsupported model code")
                caught.update(kwargs)
                raise _Caught

        self.layers[0] = Catcher(first)
        try:
            ids = torch.zeros(1, seq_len, dtype=torch.long, device=self.model.get_input_embeddings().weight.device)
            with torch.no_grad():
                self.model(input_ids=ids, use_cache=False)
        except _Caught:
            pass
        finally:
            self.layers[0] = first
        kwargs = {}
        for k, v in caught.items():
            if k in ("past_key_values", "past_key_value", "use_cache", "output_attentions"):
                continue
            kwargs[k] = _to(v, self.device, self.dtype)
        self._kwargs, self._seq_len = kwargs, seq_len
        return kwargs

    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        emb = self.model.get_input_embeddings()
        return emb(input_ids.to(emb.weight.device)).to(self.device, self.dtype)

    # -- layers ---------------------------------------------------------------------------------
    def layer_on_device(self, i: int) -> nn.Module:
        """A float copy of decoder layer i on the device (the stored model is left untouched). The
        stored layer's pages in a memory-mapped checkpoint are let go once copied (read back from
        the file when next needed), so a pass over the layers holds about one layer of the file."""
        from vllm_sqplus.checkpoint import release_file_pages
        work = copy.deepcopy(self.layers[i]).to(self.device, self.dtype)
        for p in self.layers[i].parameters():
            release_file_pages(p.data)
        return work

    @torch.no_grad()
    def run_layer(self, layer: nn.Module, hs: torch.Tensor) -> torch.Tensor:
        kwargs = self._capture_kwargs(hs.shape[1])
        outs = []
        for chunk in hs.split(self.batch_size):
            out = layer(chunk, **kwargs)
            outs.append(out[0] if isinstance(out, tuple) else out)
        return torch.cat(outs)

    # -- outputs --------------------------------------------------------------------------------
    def head_on_device(self, lm_head_stored: bool = False) -> tuple[nn.Module, nn.Module]:
        """(final norm, lm_head) on the device in the runner's dtype. lm_head_stored: the lm_head
        as stored instead (the model's own module where it is already on the device, else a copy
        in its dtype), for callers that widen it a block at a time (search._head_logits)."""
        norm = copy.deepcopy(get_module(self.model, self.arch.final_norm)).to(self.device, self.dtype)
        head = self.model.get_output_embeddings()
        if not lm_head_stored:
            return norm, copy.deepcopy(head).to(self.device, self.dtype)
        if head.weight.device != self.device:
            head = copy.deepcopy(head).to(self.device)
        return norm, head

    @torch.no_grad()
    def iter_logits(self, head: tuple[nn.Module, nn.Module], hs: torch.Tensor,
                    tokens_per_chunk: int = 1024) -> Iterator[torch.Tensor]:
        """Logits [t, vocab] of the flattened hidden states, chunk by chunk (vocab is large)."""
        norm, lm_head = head
        flat = hs.reshape(-1, hs.shape[-1])
        for chunk in flat.split(tokens_per_chunk):
            yield lm_head(norm(chunk)).float()

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [n, L, vocab] computed layer by layer (for tests: equals model(input_ids))."""
        hs = self.embed(input_ids)
        for i in range(len(self.layers)):
            hs = self.run_layer(self.layer_on_device(i), hs)
        logits = torch.cat(list(self.iter_logits(self.head_on_device(), hs)))
        return logits.reshape(*input_ids.shape, -1)


def _to(v, device, dtype):
    if isinstance(v, torch.Tensor):
        return v.to(device, dtype) if v.is_floating_point() else v.to(device)
    if isinstance(v, (tuple, list)):
        return type(v)(_to(x, device, dtype) for x in v)
    return v


ACT_STATS = ("max", "mean")  # per-input-channel max|x| (SmoothQuant) and mean|x| (AWQ)


@torch.no_grad()
def collect_act_stats(layer: nn.Module, arch: ArchSpec, runner: LayerwiseModel, hs: torch.Tensor,
                      layer_name: str = "layer", gram_group: int | None = None):
    """Run hs through one (device) layer -> ({"max"|"mean": {linear: [K]}}, layer output, grams).

    With gram_group, grams maps each linear to the block diagonal of its input's Gram matrix
    [K/g, g, g] (vllm_sqplus.clip.group_gram; linears sharing an input share one tensor); else {}.
    """
    from vllm_sqplus.clip import group_gram
    amax: dict[str, torch.Tensor] = {}
    asum: dict[str, torch.Tensor] = {}
    count: dict[str, int] = {}
    grams: dict[str, torch.Tensor] = {}
    seen: dict[str, str] = {}  # linear -> the linear whose input it shares (same tensor object)
    last: dict = {}
    hooks = []
    for name in arch.linears:
        def hook(_mod, args, name=name):
            x0 = args[0].detach()
            if last.get("x") is x0:  # q/k/v and gate/up read the same tensor: reuse its statistics
                src = last["name"]
                seen[name] = src
                return
            last.update(x=x0, name=name)
            x = x0.reshape(-1, x0.shape[-1]).float()
            ax = x.abs()
            m, t = ax.amax(dim=0), ax.sum(dim=0)
            amax[name] = m if name not in amax else torch.maximum(amax[name], m)
            asum[name] = t if name not in asum else asum[name] + t
            count[name] = count.get(name, 0) + x.shape[0]
            if gram_group is not None:
                gmat = group_gram(x, gram_group)
                grams[name] = gmat if name not in grams else grams[name] + gmat
        hooks.append(get_module(layer, name).register_forward_pre_hook(hook))
    try:
        out = runner.run_layer(layer, hs)
    finally:
        for h in hooks:
            h.remove()
    for name, m in amax.items():
        if not torch.isfinite(m).all():
            raise SqplusError(f"{layer_name}.{name}: NaN or Inf in its input activations")
    for name, src in seen.items():
        amax[name], asum[name], count[name] = amax[src], asum[src], count[src]
        if src in grams:
            grams[name] = grams[src]
    return {"max": amax, "mean": {k: v / count[k] for k, v in asum.items()}}, out, grams


@torch.no_grad()
def get_act_scales(model: nn.Module, arch: ArchSpec, samples: torch.Tensor, device="cpu",
                   batch_size: int = 4, stat: str = "max", progress: bool = False) -> list[dict[str, torch.Tensor]]:
    """Per layer, per linear: the per-input-channel max|x| (or mean|x|) over all calibration tokens."""
    runner = LayerwiseModel(model, arch, device, batch_size=batch_size)
    hs = runner.embed(samples)
    out = []
    it = range(len(runner.layers))
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="calibrate", unit="layer")
    for i in it:
        stats, hs, _ = collect_act_stats(runner.layer_on_device(i), arch, runner, hs, f"layers.{i}")
        out.append({k: v.cpu() for k, v in stats[stat].items()})
    return out
