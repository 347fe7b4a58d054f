"""Run untrusted model-written Python in a separate, limited process, never in ours.

The one idea: every limit is set by the kernel on the child before it runs a line of the
program, so nothing the program does can lift it. What is guaranteed, in every setup:
- a child process `python -I -S` (no site, no user paths, PYTHON* variables ignored), with a
  fresh temporary working directory that is deleted afterwards and an environment without
  proxies or our variables;
- rlimits: address space (RLIMIT_AS, so a huge allocation raises MemoryError), CPU seconds,
  file size, open files, no core files, and a cap on processes (RLIMIT_NPROC, so a fork bomb
  runs out of forks);
- a new session; on the wall-clock timeout the whole process group gets SIGKILL.
Where `unshare` works (as root, or with unprivileged user namespaces) the child also gets:
- an empty network namespace (no interface but a down loopback: every connection fails);
- its own PID namespace: when the namespace's first process dies, the kernel kills every
  process in it, so even a child that called setsid() to leave the process group cannot survive;
- as root, the uid `nobody` (root is exempt from RLIMIT_NPROC, and may not touch our files).
Otherwise the network block is best-effort only: a prelude replaces `socket.socket`,
`socket.create_connection` and `getaddrinfo` with functions that raise, which a determined
program can undo via `_socket`. `isolation()` says which setup is in force. Not guaranteed in
any setup: reads of world-readable files, writes to world-writable places such as /tmp.
"""

from __future__ import annotations

import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

NOBODY = 65534
MAX_PROCS = 64  # processes (threads count too) the sandbox uid may hold at once
NO_NET_PRELUDE = (
    "import socket as _s\n"
    "def _no_net(*a, **k): raise OSError('network access is disabled in the sandbox')\n"
    "_s.socket = _s.create_connection = _s.getaddrinfo = _no_net; del _s\n"
)


@dataclass
class Result:
    passed: bool
    status: str  # 'passed' | 'failed' (non-zero exit) | 'timeout' | 'error' (killed by a signal)
    stderr_tail: str
    pgid: int = 0  # the child's process group (= its pid); gone by the time run_code returns


def _world_reachable(path: str) -> bool:
    """Whether uid `nobody` can execute `path`: every parent directory must be o+x."""
    p = Path(os.path.realpath(path))
    return all(os.stat(d).st_mode & 0o001 for d in p.parents) and bool(os.stat(p).st_mode & 0o001)


@cache
def _setup() -> tuple[tuple[str, ...], str, bool]:
    """(launcher prefix, interpreter, drops to nobody). Probed once: the strongest that works."""
    unshare, setpriv = shutil.which("unshare"), shutil.which("setpriv")
    ns = ("--net", "--pid", "--fork", "--kill-child", "--")
    candidates = []
    if unshare and setpriv and os.geteuid() == 0:
        python = next(
            (
                p
                for p in (sys.executable, "/usr/bin/python3")
                if p and os.path.exists(p) and _world_reachable(p)
            ),
            None,
        )
        drop = (setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--")
        if python:
            candidates.append(((unshare, *ns, *drop), python, True))
    if unshare:
        candidates.append(((unshare, "--user", "--map-root-user", *ns), sys.executable, False))
    for prefix, python, drop in candidates:
        try:
            probe = subprocess.run(
                [*prefix, python, "-I", "-S", "-c", "pass"],
                capture_output=True,
                timeout=10,
                cwd="/",
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return prefix, python, drop
    return (), sys.executable, False


def isolation() -> str:
    """Which setup `run_code` uses here, in words."""
    prefix, _, drop = _setup()
    if not prefix:
        return "rlimits + process group; network blocked by a socket prelude (best effort)"
    return "rlimits + process group + network and PID namespaces" + (
        " + uid nobody" if drop else ""
    )


def _user_tasks(uid: int) -> int:
    """Tasks (processes and threads) owned by uid: RLIMIT_NPROC counts them all."""
    n = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.stat(f"/proc/{pid}").st_uid == uid:
                    n += len(os.listdir(f"/proc/{pid}/task"))
            except OSError:
                pass
    return n


def _limits(timeout_s: float, memory_mb: int, nproc: int):
    cpu = math.ceil(timeout_s) + 1  # CPU seconds: a backstop behind the wall-clock timeout
    mem = memory_mb * 2**20

    def apply():  # runs in the child between fork and exec
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 2**20, 16 * 2**20))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def live_members(pgid: int) -> list[int]:
    """Pids of the group's processes that are not zombies. A zombie cannot run, but it stays in
    its group until reaped, and orphans are reaped by the host's init whenever it gets to it."""
    pids = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            state, _, pgrp = stat[stat.rindex(")") + 2 :].split()[:3]  # comm may hold spaces
            if int(pgrp) == pgid and state not in "ZX":
                pids.append(int(pid))
    return pids


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the group until no live process is left (a fork bomb may fork between signals)."""
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            break
        proc.wait()
        if not live_members(proc.pid):
            break
        time.sleep(0.005)
    proc.wait()


def run_code(program: str, timeout_s: float = 5.0, memory_mb: int = 512) -> Result:
    """Run `program` (stdlib-only Python) in the sandbox; passed = it exited with status 0."""
    prefix, python, drop = _setup()
    nproc = MAX_PROCS if drop else _user_tasks(os.getuid()) + MAX_PROCS
    if not prefix:
        program = NO_NET_PRELUDE + program
    workdir = tempfile.mkdtemp(prefix="lmforge-sandbox-")
    try:
        if drop:
            os.chown(workdir, NOBODY, NOBODY)
        Path(workdir, "program.py").write_text(program, encoding="utf-8")
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
        with (
            tempfile.TemporaryFile() as err
        ):  # a file, not a pipe: output is bounded by RLIMIT_FSIZE
            proc = subprocess.Popen(
                [*prefix, python, "-I", "-S", "program.py"],
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
                preexec_fn=_limits(timeout_s, memory_mb, nproc),
            )
            try:
                code = proc.wait(timeout=timeout_s)
                status = "passed" if code == 0 else "failed" if code > 0 else "error"
            except subprocess.TimeoutExpired:
                status = "timeout"
            _kill_group(proc)  # also any child left behind by a program that exited
            err.seek(0, os.SEEK_END)
            err.seek(max(0, err.tell() - 2000))
            tail = err.read().decode("utf-8", "replace")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return Result(status == "passed", status, tail, proc.pid)
