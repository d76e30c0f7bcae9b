"""setup.py's install guards, without building: an isolated build (pip's own torch) against an
environment that runs another torch stops with one actionable line; without a GPU the CUDA build
gets a default arch list instead of torch's IndexError."""
from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _setup_helpers() -> dict:
    # setup.py runs setup() at import; take its helpers (everything above the setup() call)
    src = (ROOT / "setup.py").read_text().split("ext_modules, cmdclass =")[0]
    ns = {"__file__": str(ROOT / "setup.py"), "__name__": "setup_helpers"}
    exec(compile(src, "setup.py", "exec"), ns)
    return ns


def _fake_site(path: Path, version: str) -> Path:
    (path / "torch").mkdir(parents=True)
    (path / "torch" / "version.py").write_text(f"__version__ = '{version}'\ncuda = None\n")
    (path / "torch" / "__init__.py").write_text("")
    return path


def test_installed_torch_is_found_only_when_the_build_is_isolated(tmp_path, monkeypatch):
    h = _setup_helpers()
    target = _fake_site(tmp_path / "venv" / "site-packages", "2.13.0+cpu")
    build = _fake_site(tmp_path / "pip-build-env" / "site-packages", "2.14.1")
    monkeypatch.setattr(sysconfig, "get_paths", lambda vars=None: {"purelib": str(target),
                                                                   "platlib": str(target)})
    find = h["_installed_torch_version"]
    assert find(str(build / "torch" / "__init__.py")) == "2.13.0+cpu"  # isolated: the target's
    assert find(str(target / "torch" / "__init__.py")) is None          # --no-build-isolation
    empty = tmp_path / "fresh"
    empty.mkdir()
    monkeypatch.setattr(sysconfig, "get_paths", lambda vars=None: {"purelib": str(empty),
                                                                   "platlib": str(empty)})
    assert find(str(build / "torch" / "__init__.py")) is None          # fresh env: no torch yet


# a stand-in for the torch of pip's build env: CUDA-enabled, no GPU visible, extension classes
# that only record what they were given
FAKE_CPP_EXTENSION = """
import os
from setuptools import Extension
from setuptools.command.build_ext import build_ext
CUDA_HOME = "/usr/local/cuda"
def CppExtension(sources, **kw):
    print("CPU-ONLY")
    return Extension(kw["name"], sources)
def CUDAExtension(sources, **kw):
    print("ARCH=" + os.environ.get("TORCH_CUDA_ARCH_LIST", ""))
    return Extension(kw["name"], sources)
class BuildExtension(build_ext):
    @classmethod
    def with_options(cls, **kw):
        return cls
"""


def _run_setup_with_fake_torch(tmp_path, version: str, env_extra=None):
    fake = tmp_path / "build-env"
    (fake / "torch" / "utils").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text(
        f"__version__ = {version!r}\n"
        "class version:\n    cuda = '12.8'\n"
        "class cuda:\n    @staticmethod\n    def device_count():\n        return 0\n")
    (fake / "torch" / "utils" / "__init__.py").write_text("")
    (fake / "torch" / "utils" / "cpp_extension.py").write_text(FAKE_CPP_EXTENSION)
    import os
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_CUDA_ARCH_LIST", "SQPLUS_BUILD_CUDA")}
    env.update(env_extra or {})
    setup_py = str(ROOT / "setup.py")
    return subprocess.run([sys.executable, "-c",
                           f"import sys; sys.path[:0] = [{str(fake)!r}]; sys.argv = ['setup.py', '--version']; "
                           f"exec(compile(open({setup_py!r}).read(), 'setup.py', 'exec'), "
                           f"{{'__file__': {setup_py!r}, '__name__': '__main__'}})"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)


def _installed_torch() -> str:
    v = Path(sysconfig.get_paths()["purelib"]) / "torch" / "version.py"
    if not v.exists():
        pytest.skip("this environment has no installed torch to compare with")
    import re
    return re.search(r"^__version__\s*=\s*['\"]([^'\"]+)", v.read_text(), re.M).group(1)


def test_no_gpu_cuda_build_gets_default_arch_list(tmp_path):
    """torch's _get_cuda_arch_flags raises IndexError with nvcc, no GPU and no arch list."""
    r = _run_setup_with_fake_torch(tmp_path, _installed_torch())
    assert r.returncode == 0, r.stderr
    assert "ARCH=8.0;9.0" in r.stdout and "no GPU visible" in r.stderr, r.stdout + r.stderr
    r = _run_setup_with_fake_torch(tmp_path / "b", _installed_torch(), {"TORCH_CUDA_ARCH_LIST": "8.6"})
    assert "ARCH=8.6" in r.stdout and "no GPU visible" not in r.stderr, r.stdout + r.stderr
    r = _run_setup_with_fake_torch(tmp_path / "c", _installed_torch(), {"SQPLUS_BUILD_CUDA": "0"})
    assert "CPU-ONLY" in r.stdout, r.stdout + r.stderr


def test_mismatched_isolated_build_stops_with_one_line(tmp_path):
    """setup.py under a build-env torch that differs from the environment's installed one."""
    _installed_torch()
    r = _run_setup_with_fake_torch(tmp_path, "9.9.9+fake")
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "torch 9.9.9+fake" in lines[0] and "--no-build-isolation" in lines[0], r.stderr
