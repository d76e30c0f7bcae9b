"""Register `smoothquant_plus` with transformers as soon as transformers' quantizer registry exists.

`import vllm_sqplus` calls install(). It must stay cheap (importing transformers.quantizers costs
seconds: it pulls in torch) and must never fail where transformers is absent, so nothing is
imported here beyond the standard library:
  - transformers.quantizers already imported: register now (vllm_sqplus.hf.register);
  - not yet: a one-shot import hook (sys.meta_path) registers right after the package
    `transformers.quantizers` has executed, i.e. before any from_pretrained can look a
    quantizer up (modeling_utils imports that package at its own import);
  - transformers not installed: the hook never fires; nothing happens.
A failure inside registration is a warning, never an import error of transformers.
"""
from __future__ import annotations

import importlib.abc
import sys
import warnings

_TARGET = "transformers.quantizers"


def _register() -> None:
    try:
        from vllm_sqplus import hf
        hf.register()
    except Exception as e:  # noqa: BLE001 - transformers must keep working without us
        warnings.warn(f"vllm_sqplus: could not register smoothquant_plus with transformers: "
                      f"{type(e).__name__}: {e}", RuntimeWarning, stacklevel=2)


class _Loader(importlib.abc.Loader):
    """Delegates to the real loader, then registers once the module has executed."""

    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        _register()

    def __getattr__(self, name):  # get_resource_reader, is_package, ... of the real loader
        return getattr(self._inner, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        uninstall()  # one shot, and never find our own spec again below
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _Loader(spec.loader)
        return spec


_FINDER = _Finder()


def install() -> None:
    """Register now if transformers' quantizers are loaded, else when they are (idempotent)."""
    if _TARGET in sys.modules:
        _register()
    elif _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def uninstall() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
