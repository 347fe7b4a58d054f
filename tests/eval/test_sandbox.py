"""The sandbox: right verdicts, and every limit holds (time, memory, processes, network, files)."""

import os
import time

import pytest

from lmforge.eval.sandbox import isolation, live_members, run_code


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
    if "nobody" not in isolation():
        pytest.skip("no uid drop here: " + isolation())
    r = run_code(f"open({str(secret)!r}).read()\n")
    assert r.status == "failed" and "PermissionError" in r.stderr_tail
