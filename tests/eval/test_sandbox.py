"""The sandbox: right verdicts, and every limit holds (time, memory, processes, network, files);
hostile programs run in the strongest setup here and in simulated weaker hosts."""

import dataclasses
import json
import os
import resource
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmforge.eval import sandbox
from lmforge.eval.sandbox import isolation, live_members, run_code

REAL = sandbox._setup()
ROOT = Path(__file__).resolve().parents[2]  # the checkout, for a subprocess's PYTHONPATH
NO_NS = {"prefix": (), "namespaces": False}
NON_ROOT = {**NO_NS, "uid": None, "setuid_in_child": False, "root": False}
# the hosts we cannot be on, simulated by turning the probe's findings off one by one
SETUPS = {
    "strongest": REAL,
    # namespaces and the uid drop alone, so each hostile test checks them without the filter
    "no seccomp": dataclasses.replace(REAL, seccomp=False),
    # Docker's default seccomp profile, or no user namespaces: as root the launcher drops the uid
    "no unshare": dataclasses.replace(REAL, **NO_NS, setuid_in_child=REAL.uid is not None),
    # a non-root user's (though the program really runs as root here): seccomp and the
    # subreaper carry it
    "no unshare, no uid drop": dataclasses.replace(REAL, **NON_ROOT),
    # nothing but rlimits, the subreaper and group kill: the weak level, refused by default
    "weak": dataclasses.replace(REAL, **NON_ROOT, seccomp=False),
}


@pytest.fixture(params=list(SETUPS))
def setup(request, monkeypatch):
    """Each hostile test runs once per setup; run_code and isolation() see the patched probe."""
    s = SETUPS[request.param]
    monkeypatch.setattr(sandbox, "_setup", lambda: s)
    return s


def test_correct_solution_passes():
    r = run_code("def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\n")
    assert (r.passed, r.status, r.stderr_tail) == (True, "passed", "")


def test_failing_assertion_fails_with_its_traceback():
    r = run_code("assert 1 + 1 == 3, 'wrong sum'\n")
    assert (r.passed, r.status) == (False, "failed")
    assert "AssertionError: wrong sum" in r.stderr_tail


def test_syntax_error_fails():
    r = run_code("def f(:\n")
    assert r.status == "failed" and "SyntaxError" in r.stderr_tail


def test_infinite_loop_is_killed_within_its_time_limit():
    t0 = time.monotonic()
    r = run_code("while True:\n    pass\n", timeout_s=1.0)
    assert r.status == "timeout" and not r.passed
    assert time.monotonic() - t0 < 1.0 + 2.0
    assert live_members(r.pgid) == []


def test_sleeping_children_do_not_outlive_the_run():
    program = (
        "import os, time\nfor _ in range(3):\n    if os.fork() == 0:\n        time.sleep(60)\n"
    )
    r = run_code(program, timeout_s=2.0)  # the parent exits at once, leaving its children
    assert r.status == "passed"
    assert live_members(r.pgid) == []


def test_fork_bomb_is_stopped_and_leaves_nothing_behind():
    # guarded: the loop ends by itself after 3 s even if every sandbox limit failed
    program = (
        "import os, time\n"
        "end = time.time() + 3\n"
        "while time.time() < end:\n"
        "    try:\n"
        "        os.fork()\n"
        "    except OSError:\n"
        "        time.sleep(0.001)\n"
    )
    t0 = time.monotonic()
    r = run_code(program, timeout_s=1.0)
    assert r.status == "timeout"
    assert time.monotonic() - t0 < 1.0 + 2.0
    assert live_members(r.pgid) == []
    assert run_code("pass").passed  # the machine still forks fine


def test_process_count_is_capped():
    program = (
        "import os, sys, time\n"
        "n = 0\n"
        "for _ in range(500):\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(2)\n"
        "            os._exit(0)\n"
        "    except OSError:\n"
        "        sys.exit(f'forks stopped after {n}')\n"
        "    n += 1\n"
    )
    r = run_code(program, timeout_s=4.0)
    assert r.status == "failed" and "forks stopped after" in r.stderr_tail
    assert live_members(r.pgid) == []


def test_large_allocation_fails_within_the_memory_limit():
    t0 = time.monotonic()
    r = run_code("x = bytearray(4 * 2**30)\n", memory_mb=256)
    assert r.status == "failed" and "MemoryError" in r.stderr_tail
    assert time.monotonic() - t0 < 3.0


def test_working_directory_is_fresh_and_removed():
    program = (
        "import os, sys\n"
        "assert os.listdir('.') == ['program.py'], os.listdir('.')\n"
        "open('scratch.txt', 'w').write('x')\n"
        "sys.stderr.write(os.getcwd())\n"
    )
    r = run_code(program)
    assert r.passed, r.stderr_tail
    workdir = r.stderr_tail.strip()
    assert "lmforge-sandbox-" in workdir and not os.path.exists(workdir)


def test_environment_has_no_proxies_or_secrets(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("LMFORGE_SECRET", "s3cret")
    r = run_code(
        "import os\nassert not any('PROXY' in k.upper() or 'SECRET' in k for k in os.environ)\n"
    )
    assert r.passed, r.stderr_tail


def test_network_access_fails():
    program = (
        "import socket\n"
        "try:\n"
        "    socket.create_connection(('1.1.1.1', 53), timeout=2)\n"
        "except OSError:\n"
        "    raise SystemExit(0)\n"
        "raise SystemExit('connected')\n"
    )
    r = run_code(program)
    assert r.passed, (isolation(), r.stderr_tail)


@pytest.mark.skipif(os.geteuid() != 0, reason="uid drop only applies when the evaluator is root")
def test_program_cannot_read_root_only_files(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret")
    secret.chmod(0o600)
    if "uid nobody" not in isolation().mechanisms:
        pytest.skip(f"no uid drop here: {isolation()}")
    r = run_code(f"open({str(secret)!r}).read()\n")
    assert r.status == "failed" and "PermissionError" in r.stderr_tail


def test_the_real_setup_is_strong_as_root_with_unshare():
    iso = isolation()
    assert iso.level in sandbox.LEVELS and "subreaper" in iso.mechanisms
    if os.geteuid() == 0 and REAL.namespaces:  # as here and in CI
        assert iso.level == "strong" and iso.gaps == ()


def test_levels_of_the_simulated_setups():
    levels = {name: isolation(s).level for name, s in SETUPS.items()}
    assert levels["no seccomp"] == levels["strongest"] or not REAL.seccomp
    if REAL.seccomp:
        assert levels["no unshare, no uid drop"] == "medium"
        assert "files" in isolation(SETUPS["no unshare, no uid drop"]).gaps[0]
    assert levels["weak"] == "weak"
    as_root = dataclasses.replace(SETUPS["no unshare, no uid drop"], root=True)
    assert isolation(as_root).level == "weak"  # root without a uid drop: never medium
    assert any(g.startswith("root") for g in isolation(as_root).gaps)
    assert any(g.startswith("network") for g in isolation(SETUPS["weak"]).gaps)


def test_check_isolation_refuses_below_medium_unless_unsafe(monkeypatch):
    from lmforge.config import ConfigError

    monkeypatch.setattr(sandbox, "_setup", lambda: SETUPS["weak"])
    with pytest.raises(ConfigError, match="only 'weak'.*--unsafe-exec"):
        sandbox.check_isolation()
    assert sandbox.check_isolation(unsafe_exec=True).level == "weak"


def test_seccomp_filter_jumps_land_inside_the_program():
    for machine in ("x86_64", "aarch64"):
        prog = sandbox.seccomp_filter(1234, machine)
        n = len(prog) // 8
        for i in range(n):
            code, jt, jf, _ = struct.unpack_from("HBBI", prog, 8 * i)
            if code in (0x15, 0x35):  # conditional jumps
                assert i + 1 + max(jt, jf) < n
        assert struct.unpack_from("HBBI", prog, 8 * (n - 1))[0] == 0x06  # a return


# --- hostile programs (made-up attacks), each bounded by a short timeout


def test_hostile_loopback_connection_fails(setup):
    with socket.socket() as srv:  # the test's own listener on 127.0.0.1
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        srv.settimeout(0)
        port = srv.getsockname()[1]
        program = (  # _socket: past the Python-level prelude of the weak level
            "import _socket\n"
            "s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)\n"
            "s.settimeout(2)\n"
            f"s.connect(('127.0.0.1', {port}))\n"
        )
        r = run_code(program, timeout_s=5)
        if isolation().level == "weak":
            return  # nothing below Python blocks it: why the weak level is refused
        assert r.status == "failed" and (
            "PermissionError" in r.stderr_tail or "Errno" in r.stderr_tail
        )
        with pytest.raises(BlockingIOError):
            srv.accept()  # nothing got through


def test_hostile_environment_read_finds_no_secret(setup, monkeypatch):
    secret = secrets.token_hex(8)
    monkeypatch.setenv("LMFORGE_TEST_SECRET", secret)
    r = run_code("import os\nprint(sorted(os.environ.items()))\n")
    assert r.passed and secret not in r.stdout_tail and "LMFORGE" not in r.stdout_tail
    assert "PATH" in r.stdout_tail


def test_hostile_program_cannot_kill_the_evaluator(setup):
    # a stand-in for the evaluator (our uid, alive until we end it), and the program's parent
    # (the launcher; none visible in a PID namespace). Never kill(-1): as root it would take
    # the whole machine if a layer were broken. The back door: make the stand-in the SIGIO
    # owner of a socket, with SIGKILL as the signal, and write to the socket
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        program = (
            "import fcntl, os, signal, socket\n"
            f"for pid in ({stand_in.pid}, os.getppid()):\n"
            "    try:\n"
            "        os.kill(pid or 999999, signal.SIGKILL)  # 0 would be our own group\n"
            "        print('killed', pid)\n"
            "    except OSError:\n"
            "        print('denied', pid)\n"
            "a, b = socket.socketpair()\n"
            "try:\n"
            f"    fcntl.fcntl(a, fcntl.F_SETOWN, {stand_in.pid})\n"
            "    fcntl.fcntl(a, 10, signal.SIGKILL)  # F_SETSIG\n"
            "    fcntl.fcntl(a, fcntl.F_SETFL, os.O_ASYNC)\n"
            "    b.send(b'x')\n"
            "except OSError as e:\n"
            "    print('sigio', e)\n"
            "import resource\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))  # its own: allowed\n"
            "try:  # the evaluator's: a CPU limit of 1 s would kill it later\n"
            f"    resource.prlimit({stand_in.pid}, resource.RLIMIT_NOFILE, (3, 3))\n"
            "    print('killed limits')\n"
            "except OSError:\n"
            "    print('denied prlimit')\n"
        )
        nofile = resource.prlimit(stand_in.pid, resource.RLIMIT_NOFILE)
        r = run_code(program, timeout_s=5)
        if isolation().level == "weak":  # the program kills the launcher: the gap is stated
            assert any(g.startswith("evaluator") for g in isolation().gaps)
            return
        with pytest.raises(subprocess.TimeoutExpired):  # the evaluator's stand-in lives on
            stand_in.wait(timeout=0.2)  # (a signal already sent would land well within this)
        assert r.status == "passed" and "killed" not in r.stdout_tail, r.stdout_tail
        assert resource.prlimit(stand_in.pid, resource.RLIMIT_NOFILE) == nofile
    finally:
        stand_in.kill()
        stand_in.wait()


def _alive_with_name(name: str) -> list[int]:
    pids = []
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and open(f"/proc/{pid}/comm").read().strip() == name:
                if open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] not in "ZX":
                    pids.append(int(pid))
        except OSError:
            pass
    return pids


def _sleeper(name: str, parent_hangs: bool = False) -> str:
    """A program whose grandchild leaves the group with setsid(), names itself `name` (so we
    can look for it on the host even when its pid lives in a PID namespace) and sleeps."""
    return (
        "import ctypes, os, time\n"
        "r, w = os.pipe()\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        f"        ctypes.CDLL(None).prctl(15, {name.encode()!r}, 0, 0, 0)  # PR_SET_NAME\n"
        "        print('pid', os.getpid(), flush=True)\n"
        "        os.write(w, b'x')\n"
        "        time.sleep(30)\n"
        "    os._exit(0)\n"
        "os.read(r, 1)  # the sleeper runs\n" + ("time.sleep(30)\n" if parent_hangs else "")
    )


@pytest.mark.parametrize("parent", ["exits", "hangs"])
def test_hostile_setsid_sleeper_does_not_outlive_the_run(setup, parent):
    name = "lmf" + secrets.token_hex(6)
    r = run_code(_sleeper(name, parent == "hangs"), timeout_s=2)
    assert r.status == ("timeout" if parent == "hangs" else "passed"), r.stderr_tail
    assert "pid" in r.stdout_tail  # the sleeper did start
    assert _alive_with_name(name) == []
    if not setup.namespaces:  # its pid means something out here too
        pid = int(r.stdout_tail.split()[1])
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_hostile_program_cannot_touch_the_users_files(setup, tmp_path):
    victim = tmp_path / "victim.txt"  # the user's file, outside the sandbox
    victim.write_text("keep me")
    program = (
        "import os\n"
        f"for act in (lambda: os.remove({str(victim)!r}),\n"
        f"            lambda: open({str(tmp_path / 'planted.txt')!r}, 'w').write('x')):\n"
        "    try:\n"
        "        act()\n"
        "        print('done')\n"
        "    except OSError as e:\n"
        "        print('denied', type(e).__name__)\n"
    )
    r = run_code(program)
    if setup.uid is None:
        assert any(g.startswith("files") for g in isolation().gaps)  # said, not hidden
        return
    assert r.stdout_tail.split().count("denied") == 2, r.stdout_tail
    assert victim.read_text() == "keep me" and not (tmp_path / "planted.txt").exists()


def test_the_filter_still_lets_a_program_signal_itself(setup):
    if setup.namespaces:
        pytest.skip("the program is pid 1 of its namespace, which ignores SIGKILL from inside")
    r = run_code("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    assert (r.status, r.passed) == ("error", False), r.stderr_tail


NON_ROOT_EVALUATOR = """
import json, os, socket, sys
from lmforge.eval import sandbox

me = os.getpid()
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen()
port = srv.getsockname()[1]
programs = {
    "environ": f"open('/proc/{me}/environ', 'rb').read()\\n",
    "mem": f"open('/proc/{me}/mem', 'rb')\\n",
    "kill": f"import os\\nos.kill({me}, 9)\\n",
    "connect": f"import _socket\\ns = _socket.socket()\\ns.settimeout(2)\\n"
    f"s.connect(('127.0.0.1', {port}))\\n",
    "sleeper": sys.argv[1],
}
status = {k: sandbox.run_code(p, timeout_s=2).status for k, p in programs.items()}
print(json.dumps({"level": sandbox.isolation().level, "status": status}))
"""


@pytest.mark.skipif(
    REAL.uid is None or not shutil.which("setpriv"), reason="needs root to become nobody"
)
def test_as_a_real_non_root_user_without_unshare():
    # the evaluator itself runs as nobody with no unshare on its PATH: the layers left are
    # seccomp, the subreaper and the non-dumpable evaluator; a secret sits in its environment
    name = "lmf" + secrets.token_hex(6)
    drop = [
        shutil.which("setpriv"),
        f"--reuid={sandbox.NOBODY}",
        f"--regid={sandbox.NOBODY}",
        "--clear-groups",
    ]
    env = {"PATH": "/nonexistent", "PYTHONPATH": str(ROOT), "LMFORGE_SECRET": "s3cret"}
    cmd = [*drop, REAL.python, "-c", NON_ROOT_EVALUATOR, _sleeper(name)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd="/")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    if REAL.seccomp:
        assert report["level"] == "medium"
        assert report["status"] == {
            "environ": "failed",  # PermissionError: the evaluator is not dumpable meanwhile
            "mem": "failed",
            "kill": "failed",  # PermissionError from the filter; the evaluator answered
            "connect": "failed",
            "sleeper": "passed",
        }
    assert _alive_with_name(name) == []
