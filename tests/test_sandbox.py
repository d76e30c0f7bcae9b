"""The sandbox that runs generated code: a correct sample passes, a wrong one fails, and each hostile
sample fails itself and harms nothing else. Hostile samples run with the in-child guard OFF where
possible, so the OS layers (uid drop, namespaces, rlimits, process-group/uid kill) are proven on their
own; the guard gets its own tests with the namespaces off.
"""
import os
import secrets
import socket
import threading
import time

import pytest

from vllm_sqplus.eval.sandbox import SANDBOX_UID_BASE, Limits, isolation, kill_uid, run_many, run_program

ISO = isolation()
needs_ns = pytest.mark.skipif(not ISO["netns"], reason="unshare namespaces unavailable here")
needs_uid = pytest.mark.skipif(not ISO["uid_drop"], reason="uid drop needs root")
FAST = Limits(timeout_s=8, cpu_s=5)


def _procs_with(marker: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(pid))
            except OSError:
                pass
    return found


def _uid_procs(uid: int) -> int:
    n = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/status") as f:
                    n += any(ln.startswith("Uid:") and int(ln.split()[1]) == uid for ln in f)
            except OSError:
                pass
    return n


def test_correct_passes_wrong_fails():
    ok = run_program("def f(x):\n    return x + 1\nassert f(1) == 2\n", FAST)
    assert ok.passed and ok.status == "passed", ok
    bad = run_program("def f(x):\n    return x\nassert f(1) == 2\n", FAST)
    assert not bad.passed and bad.status.startswith("failed: AssertionError"), bad
    syn = run_program("def f(:\n", FAST)
    assert not syn.passed and "SyntaxError" in syn.status


@pytest.mark.parametrize("code", ["import sys\nsys.exit(0)", "import os\nos._exit(0)", "raise SystemExit"])
def test_exiting_early_is_not_passing(code):
    r = run_program(code + "\nassert False\n", FAST)
    assert not r.passed, r


def test_clean_environment_and_private_cwd(monkeypatch):
    monkeypatch.setenv("SQPLUS_SECRET_TOKEN", "hunter2")
    code = ("import os, sys\n"
            "assert 'SQPLUS_SECRET_TOKEN' not in os.environ, 'env leaked'\n"
            "assert os.environ['HOME'] == os.getcwd() == os.environ['TMPDIR']\n"
            "assert os.getcwd() != %r\n"
            "open('scratch.txt', 'w').write('ok')\n"
            "assert sys.flags.isolated\n") % os.getcwd()
    r = run_program(code, FAST)
    assert r.passed, r


@pytest.mark.parametrize("guard", [False, True])
def test_cannot_delete_or_write_outside_its_folder(tmp_path, guard):
    canary = tmp_path / "canary.txt"
    canary.write_text("alive")
    intruder = tmp_path / "intruder.txt"
    escape = f"/tmp/sqplus-escape-{secrets.token_hex(4)}"
    code = (f"import os, shutil\n"
            f"try:\n    open({escape!r}, 'w').write('x')\nexcept OSError:\n    pass\n"
            f"os.remove({str(canary)!r})\n"
            f"open({str(intruder)!r}, 'w').write('x')\n")
    if not guard and not ISO["uid_drop"]:
        pytest.skip("without root only the guard protects the user's own files")
    r = run_program(code, FAST, guard=guard)
    assert not r.passed, r
    assert canary.read_text() == "alive"
    assert not intruder.exists()
    if ISO["mount_tmp"]:  # its /tmp is a private tmpfs: the write, if any, vanished with it
        assert not os.path.exists(escape)
    else:
        if os.path.exists(escape):
            os.remove(escape)


@needs_uid
def test_cannot_touch_the_project_tree():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    target = os.path.join(root, "setup.py")
    before = open(target, "rb").read()
    r = run_program(f"open({target!r}, 'a').write('# pwned')\n", FAST, guard=False, use_namespaces=False)
    assert not r.passed and "PermissionError" in r.status, r
    assert open(target, "rb").read() == before


@pytest.mark.skipif(not ISO["nproc"], reason="RLIMIT_NPROC is not enforced for this user")
def test_fork_bomb_is_bounded_and_cleaned_up():
    marker = "forkbomb-" + secrets.token_hex(4)
    code = f"import os, time\n# {marker}\nwhile True:\n    os.fork()\n"
    t0 = time.monotonic()
    r = run_program(code, Limits(timeout_s=6, cpu_s=3, nproc=16), guard=False, slot=7)
    assert time.monotonic() - t0 < 30
    assert not r.passed, r
    if ISO["uid_drop"]:
        assert _uid_procs(SANDBOX_UID_BASE + 7) == 0
    # the machine can still fork
    assert os.system("true") == 0


def test_fork_is_blocked_by_guard():
    r = run_program("import os\nos.fork()\n", FAST, guard=True, use_namespaces=False)
    assert not r.passed and "blocked by sandbox" in r.status, r


class _Listener:
    """A real server on 127.0.0.1 that records whether anybody connected."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop:
            try:
                c, _ = self.sock.accept()
                self.connections += 1
                c.close()
            except OSError:
                pass

    def close(self):
        self.stop = True
        self.thread.join()
        self.sock.close()


@pytest.mark.parametrize("layers", [
    pytest.param(dict(guard=False), marks=needs_ns, id="netns-only"),
    pytest.param(dict(guard=True, use_namespaces=False), id="guard-only"),
    pytest.param(dict(), id="default"),
])
def test_socket_to_localhost_fails(layers):
    srv = _Listener()
    try:
        # the listener itself is reachable from an unsandboxed process: the test can fail
        with socket.create_connection(("127.0.0.1", srv.port), timeout=2):
            pass
        time.sleep(0.3)
        seen = srv.connections
        assert seen == 1
        code = f"import socket\ns = socket.create_connection(('127.0.0.1', {srv.port}), timeout=2)\n"
        r = run_program(code, FAST, **layers)
        time.sleep(0.3)
        assert not r.passed, r
        assert srv.connections == seen
    finally:
        srv.close()


def test_infinite_loop_times_out():
    t0 = time.monotonic()
    r = run_program("while True:\n    pass\n", Limits(timeout_s=2, cpu_s=30))
    assert r.status == "timed out", r
    assert time.monotonic() - t0 < 10


def test_cpu_limit_kills_a_spinning_sample():
    r = run_program("while True:\n    pass\n", Limits(timeout_s=30, cpu_s=1), guard=False)
    assert not r.passed and "CPU time limit" in r.status, r
    assert r.elapsed_s < 20


@pytest.mark.parametrize("code", ["x = bytearray(16 * 2**30)\n",
                                  "xs = []\nwhile True:\n    xs.append(bytearray(2**26))\n"])
def test_huge_allocation_fails(code):
    r = run_program(code, Limits(timeout_s=20, memory_bytes=512 << 20), guard=False)
    assert not r.passed and r.status != "timed out", r
    assert "MemoryError" in r.status or "killed" in r.status, r


def test_file_size_and_output_floods_are_capped():
    big = run_program("open('big', 'wb').write(b'x' * (64 << 20))\n", Limits(fsize_bytes=1 << 20), guard=False)
    assert not big.passed and ("SIGXFSZ" in big.status or "File too large" in big.status), big
    flood = run_program("while True:\n    print('y' * 4096)\n", Limits(timeout_s=20, fsize_bytes=1 << 20),
                        guard=False)
    assert not flood.passed and flood.status != "timed out", flood
    assert len(flood.stdout) <= 4096


@pytest.mark.parametrize("layers", [
    pytest.param(dict(), marks=needs_ns, id="pidns+uid"),
    pytest.param(dict(use_namespaces=False), marks=needs_uid, id="uid-kill-only"),
    pytest.param(dict(drop_uid=False), marks=needs_ns, id="pidns-only"),
    pytest.param(dict(use_namespaces=False, drop_uid=False), id="process-group-only"),
])
def test_background_child_is_dead_afterwards(layers):
    marker = "sqplus-orphan-" + secrets.token_hex(6)
    # a grandchild that leaves the process group (setsid) and outlives the sample
    setsid = "True" if layers != dict(use_namespaces=False, drop_uid=False) else "False"
    code = ("import subprocess, sys\n"
            f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)', {marker!r}],"
            f" start_new_session={setsid})\n")
    r = run_program(code, FAST, guard=False, slot=3, **layers)
    assert r.passed, r  # the sample itself was fine; what it left behind is the point
    deadline = time.monotonic() + 5
    while _procs_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _procs_with(marker) == []


def test_run_many_keeps_order_and_isolates_failures():
    progs = ["assert True", "assert False", "while True: pass", "assert 2 + 2 == 4"]
    # 10 s: a 3 s wall limit timed out "assert True" itself while a HumanEval run and the suite shared
    # the 2 cores (the sandboxed interpreter's start-up); the endless loop still reaches the wall limit
    res = run_many(progs, Limits(timeout_s=10, cpu_s=10), workers=2)
    assert [r.status.split(":")[0] for r in res] == ["passed", "failed", "timed out", "passed"]


@needs_uid
def test_kill_uid_kills_only_that_uid():
    import subprocess
    uid = SANDBOX_UID_BASE + 11
    p = subprocess.Popen(["sleep", "60"], user=uid, group=uid)
    mine = subprocess.Popen(["sleep", "60"])
    try:
        assert kill_uid(uid) == 1
        assert p.wait(timeout=5) == -9
        assert mine.poll() is None
    finally:
        mine.kill()
        mine.wait()


def test_interpreter_outside_folders_the_sandbox_hides():
    """A virtualenv under /tmp (a CI clone there) is hidden by the private tmpfs: the sample must get
    the real interpreter instead, or its own subprocess.Popen([sys.executable, ...]) fails."""
    import os
    import sys
    from vllm_sqplus.eval import sandbox
    venv_bin = os.path.dirname(sys.executable)
    exe = sandbox._interpreter(False, hidden=(venv_bin,))
    assert not exe.startswith(venv_bin + "/") and os.path.exists(exe)
    assert sandbox._interpreter(False, hidden=()) == sys.executable
    assert sandbox._under("/tmp/x/python", ("/tmp",)) and not sandbox._under("/tmpfoo/python", ("/tmp",))
