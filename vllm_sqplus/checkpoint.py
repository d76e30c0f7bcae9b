"""Hugging Face checkpoint in and out: validate before any heavy work, never touch the input,
write the output atomically (a temporary sibling folder, renamed into place at the end)."""
from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from vllm_sqplus import QUANT_METHOD
from vllm_sqplus.arch import ArchSpec, get_arch, get_module
from vllm_sqplus.errors import SqplusError
from vllm_sqplus.quant import QuantError, check_group_size

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_SKIP_FILES = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


_PEAK_BEFORE_RESETS_KIB = 0  # the highest VmHWM that reset_peak_rss has cleared


def peak_rss_gib() -> float:
    """This process's peak resident set so far, GiB, across reset_peak_rss's resets: Linux's
    ru_maxrss (KiB) follows the VmHWM that a reset clears, so the peaks cleared are kept here."""
    import resource
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, _PEAK_BEFORE_RESETS_KIB) / 2**20


def proc_status_kib(key: str) -> int:
    """A KiB figure of /proc/self/status (VmRSS, VmHWM, ...); 0 where there is none (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peak_rss() -> bool:
    """Reset VmHWM (the peak that proc_status_kib("VmHWM") reads) to the current resident set, so
    the next reading is the peak since now. The kernel's ru_maxrss follows the reset (so does what
    `/usr/bin/time` reports for the process: only the peak after the last reset); peak_rss_gib keeps
    the whole run's. False where the kernel does not offer it (/proc/self/clear_refs, Linux 4.0+)."""
    global _PEAK_BEFORE_RESETS_KIB
    _PEAK_BEFORE_RESETS_KIB = max(_PEAK_BEFORE_RESETS_KIB, proc_status_kib("VmHWM"))
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PhasePeaks:
    """Peak resident set per phase, GiB: `mark(name)` records the peak since the previous mark and
    starts the next phase. New (gib None): marks "before", the process's peak up to then; given an
    earlier object's `gib`, goes on from there. Records nothing where the peak cannot be reset."""

    def __init__(self, gib: dict[str, float] | None = None):
        self.ok = reset_peak_rss()  # the next phase's peak starts now
        self.gib = gib if gib is not None else ({"before": round(peak_rss_gib(), 3)} if self.ok else {})

    def mark(self, phase: str) -> None:
        trim_heap()  # what the phase freed goes back to the system before the next one starts
        if self.ok:
            self.gib[phase] = round(proc_status_kib("VmHWM") / 2**20, 3)
            reset_peak_rss()


def _file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's file-backed memory mappings of weight files (Linux)."""
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].strip().endswith(_WEIGHT_SUFFIXES):
                    a, b = parts[0].split("-")
                    out.append((int(a, 16), int(b, 16)))
    except OSError:
        pass
    return out


def _file_page_runs(lo: int, n: int, page: int) -> list[tuple[int, int]]:
    """(first page address, page count) runs among the n pages from address lo that are resident
    and still file pages (/proc/self/pagemap bit 61): a page written since the mapping was made is
    a private anonymous copy (bit 61 clear) and is never in a run. [] where pagemap is unreadable."""
    import numpy as np
    try:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(lo // page * 8)
            e = np.frombuffer(f.read(n * 8), dtype=np.uint64)
    except OSError:
        return []
    if e.size != n:
        return []
    ok = ((e >> np.uint64(61)) & np.uint64(1)).astype(bool)
    edges = np.flatnonzero(np.diff(np.concatenate(([0], ok.view(np.int8), [0]))))
    return [(lo + int(s0) * page, int(s1 - s0)) for s0, s1 in zip(edges[::2], edges[1::2])]


@functools.lru_cache(maxsize=1)
def _libc():
    """The C library, with madvise's signature (loaded once: release_file_pages runs per weight)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    return libc


def trim_heap() -> bool:
    """Give the C heap's free memory back to the system (glibc malloc_trim): tensors freed
    between phases otherwise stay in the resident set as free heap pages. False where the C
    library has no malloc_trim (not glibc)."""
    fn = getattr(_libc(), "malloc_trim", None)
    if fn is None:
        return False
    fn(0)
    return True


class LayerSpill:
    """A list of per-layer results (dicts of tensors and tuples of tensors) kept in files of a
    temporary folder instead of memory: append(x) writes the next layer's, [i] reads layer i's
    back, [i] = None deletes it (a consumer lets go of what it has applied). The folder goes
    when the object does (or at close()). For the GPTQ stage's packed codes: 0.65 GB on
    Qwen2.5-1.5B that would otherwise sit in memory from the stage to the end of the write."""

    def __init__(self, parent: str | os.PathLike | None = None):
        import weakref
        self.dir = Path(tempfile.mkdtemp(prefix=".sqplus-spill-", dir=parent))
        self._n = 0
        self._close = weakref.finalize(self, shutil.rmtree, str(self.dir), True)

    def _path(self, i: int) -> Path:
        if not -self._n <= i < self._n:
            raise IndexError(f"layer {i} of {self._n}")
        return self.dir / f"{i % self._n}.pt"

    def append(self, x) -> None:
        tmp = self.dir / f"{self._n}.pt.tmp"
        torch.save(x, tmp)
        tmp.rename(self.dir / f"{self._n}.pt")
        self._n += 1

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int):
        p = self._path(i)
        return torch.load(p, weights_only=True) if p.exists() else None

    def __setitem__(self, i: int, x) -> None:
        if x is not None:
            raise TypeError("LayerSpill: only None (let go of a layer) can be assigned")
        self._path(i).unlink(missing_ok=True)

    def __iter__(self):
        return (self[i] for i in range(self._n))

    def close(self) -> None:
        self._close()


def release_file_pages(t: torch.Tensor) -> int:
    """Drop from this process's resident memory the pages of a tensor whose data lies in a
    memory-mapped weight file (a checkpoint loaded by safetensors' mmap) and that are still the
    file's own pages: after a layer's weights are copied or replaced, their mapped pages would
    otherwise stay counted in the resident set until the whole file is unmapped. Safe for a tensor
    still in use: a file page dropped is read back from the file when touched again (same bytes),
    a page written since loading (a private copy, told apart by /proc/self/pagemap) is never
    dropped, and only pages wholly inside the tensor are considered (madvise MADV_DONTNEED).
    Returns the bytes released (0 where the tensor is not file-backed, or off Linux)."""
    import ctypes
    import mmap
    if t.device.type != "cpu" or not hasattr(mmap, "MADV_DONTNEED"):
        return 0
    start = t.untyped_storage().data_ptr()
    end = start + t.untyped_storage().nbytes()
    if not any(a <= start and end <= b for a, b in _file_mappings()):
        return 0
    page = mmap.PAGESIZE
    lo, hi = -(-start // page) * page, (end // page) * page
    if hi <= lo:
        return 0
    libc = _libc()
    freed = 0
    for addr, count in _file_page_runs(lo, (hi - lo) // page, page):
        if libc.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(count * page), mmap.MADV_DONTNEED) == 0:
            freed += count * page
    return freed


def read_config(model_dir: str | os.PathLike) -> dict:
    d = Path(model_dir)
    if not d.exists():
        raise SqplusError(f"model folder not found: {d}")
    if not d.is_dir():
        raise SqplusError(f"not a folder: {d}")
    cfg = d / "config.json"
    if not cfg.is_file():
        raise SqplusError(f"{d} is not a Hugging Face checkpoint (no config.json)")
    try:
        return json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SqplusError(f"{cfg} is not valid JSON: {e}") from None


def check_output_dir(model_dir: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool) -> Path:
    src, out = Path(model_dir).resolve(), Path(out_dir).resolve()
    if out == src:
        raise SqplusError("--out must differ from the input model folder (the input is never modified)")
    if src in out.parents:
        raise SqplusError(f"--out {out} lies inside the input model folder {src}; choose another place")
    if out in src.parents:
        raise SqplusError(f"--out {out} contains the input model folder; choose another place")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise SqplusError(f"output {out} exists and is not empty (pass --overwrite to replace it)")
    return out


def load_model(model_dir: str | os.PathLike, dtype: str = "auto"):
    """(model, arch) after validating folder, config, architecture, weights files and finiteness."""
    raw = read_config(model_dir)
    qc = raw.get("quantization_config")
    if qc:
        method = qc.get("quant_method", "?")
        what = "already smoothed by SmoothQuant+" if method == QUANT_METHOD else f"already quantized ({method})"
        raise SqplusError(f"{model_dir} is {what}; start from the full-precision checkpoint")
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad checkpoint
        raise SqplusError(f"cannot read the config of {model_dir}: {e}") from None
    arch = get_arch(config)
    files = [p for p in Path(model_dir).iterdir() if p.name.endswith((".safetensors", ".bin"))]
    if not files:
        raise SqplusError(f"{model_dir} has no weight files (*.safetensors or *.bin)")
    if dtype == "auto":
        stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        torch_dtype = stored if isinstance(stored, torch.dtype) else DTYPES.get(str(stored), torch.float32)
    else:
        torch_dtype = DTYPES[dtype]
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, attn_implementation="sdpa")
    except Exception as e:  # noqa: BLE001 - truncated / corrupt weights, missing tensors, ...
        raise SqplusError(f"cannot load weights of {model_dir}: {type(e).__name__}: {e}") from None
    model.eval()
    check_finite(model, model_dir)
    return model, arch


def check_finite(model, model_dir) -> None:
    """Every weight finite, else one error naming it. Reading a memory-mapped checkpoint through
    makes all of it resident: each weight's file pages are let go once checked
    (release_file_pages), so the check leaves the process as small as the load did."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise SqplusError(f"{model_dir}: weight {name} contains NaN or Inf")
        release_file_pages(p.data)


def check_group_size_for_config(raw: dict, group_size: int) -> None:
    """The kernels' group-size rule on every input width of a decoder layer, from config.json alone
    (before any heavy work): one error naming the flag, the width and the group sizes that fit."""
    from vllm_sqplus.config import check_group_size_supported
    heads = raw.get("num_attention_heads") or 1
    widths = {"hidden_size": raw.get("hidden_size"), "intermediate_size": raw.get("intermediate_size"),
              "num_attention_heads x head_dim": heads * (raw.get("head_dim") or (raw.get("hidden_size") or 0) // heads)}
    for what, k in widths.items():
        if isinstance(k, int) and k > 0:
            check_group_size_supported(k, group_size, f"--group-size {group_size} ({what} {k})")


def check_group_sizes(model, arch: ArchSpec, group_size: int) -> None:
    """Every quantized linear's in_features must be a multiple of the group (one clear error)."""
    for i, layer in enumerate(get_module(model, arch.layers)):
        for name in arch.linears:
            k = get_module(layer, name).in_features
            try:
                check_group_size(k, group_size, f"layers.{i}.{name}")
            except QuantError as e:
                raise SqplusError(str(e)) from None


def write_checkpoint_atomic(out_dir: Path, overwrite: bool, write) -> None:
    """Call write(tmp_dir) in a temporary sibling of out_dir, then rename it into place."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        write(tmp)
        if out_dir.exists():
            if not overwrite and any(out_dir.iterdir()):
                raise SqplusError(f"output {out_dir} appeared while writing; not replacing it")
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_side_files(src: str | os.PathLike, dst: Path) -> None:
    """Tokenizer, generation config, chat template...: every top-level file that is not weights/config."""
    for p in Path(src).iterdir():
        if p.is_file() and p.name not in _SKIP_FILES and not p.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(p, dst / p.name)


def save_model(model, src_dir, tmp: Path, quantization_config: dict) -> None:
    """save_pretrained (safetensors; ties handled by transformers) + side files + our config entry."""
    model.save_pretrained(tmp, safe_serialization=True)
    copy_side_files(src_dir, tmp)
    cfg_path = tmp / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"] = quantization_config
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def load_full_precision(model_dir: str | os.PathLike, dtype: torch.dtype = torch.float32, **kwargs):
    """A smoothed checkpoint as the plain full-precision model it is, bypassing our transformers
    quantizer (which `import vllm_sqplus` registers: from_pretrained would give INT4 linears).
    For evaluation and tests that need the smoothed weights themselves."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(model_dir)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=dtype, **kwargs).eval()
