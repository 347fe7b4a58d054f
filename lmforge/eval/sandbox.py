"""Run untrusted model-written Python in a separate, limited process, never in ours.

The one idea: containment is several independent layers, each set by the kernel on the child
before it runs a line of the program, so no single missing mechanism lets the program out, and
`isolation()` reports exactly which layers are in force. The program runs as
`python -I -S program.py` (no site, no user paths, PYTHON* variables ignored) under a small
launcher, this file run as a script, which stays outside the sandbox:

- clean environment (PATH, LANG, HOME=TMPDIR=a fresh temporary directory, deleted afterwards);
- rlimits: address space (RLIMIT_AS: a huge allocation raises MemoryError), CPU seconds, file
  size, open files, no core files, processes (RLIMIT_NPROC: a fork bomb runs out of forks);
- whole-tree kill: the launcher is a child subreaper (PR_SET_CHILD_SUBREAPER), so every process
  the program starts stays its descendant even after setsid() and double forks; at the end it
  SIGKILLs and reaps descendants until none is left. The evaluator also kills the launcher's
  process group as a backstop. The launcher, and the evaluator while a program runs, are not
  dumpable, so a same-uid program can open neither's /proc/PID/environ, mem or fd;
- uid `nobody` when we are root (setpriv inside the namespaces, else setresuid in the launcher's
  child): the program cannot signal us or read and delete the user's files;
- where `unshare` works (root, or unprivileged user namespaces): an empty network namespace and
  a PID namespace with its own /proc (when its first process dies the kernel kills the rest);
- where seccomp works: a hand-built classic BPF filter (no libseccomp binding is needed, and
  none ships with CPython; x86_64 and aarch64) makes these fail with EPERM: socket(),
  io_uring_setup(), ptrace, process_vm_*, setting a SIGIO owner (fcntl F_SETOWN, ioctl
  FIOSETOWN), other processes' rlimits (prlimit64), and signals to any pid but that of the
  launcher's child (the first process the sandbox runs: unshare re-raises its child's fatal
  signal on itself). It blocks the network without namespaces (Docker's default seccomp
  profile, hosts without user namespaces) and keeps a same-uid program off the evaluator.
Without namespaces or seccomp, network access is blocked only by a prelude that replaces
`socket.socket` and friends, which a program can undo via `_socket`: the "weak" level, which
`check_isolation` refuses unless the user says --unsafe-exec. Never guaranteed: reads of
world-readable files, writes to world-writable places such as /tmp; and without the uid drop the
program can read, write and delete what the user can.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import platform
import resource
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

NOBODY = 65534
MAX_PROCS = 64  # processes (threads count too) the sandbox uid may hold at once
KILL_GRACE_S = 5.0  # the launcher's bound on killing and reaping what the program left
NO_NET_PRELUDE = (
    "import socket as _s\n"
    "def _no_net(*a, **k): raise OSError('network access is disabled in the sandbox')\n"
    "_s.socket = _s.create_connection = _s.getaddrinfo = _no_net; del _s\n"
)
LEVELS = ("weak", "medium", "strong")
MIN_LEVEL = "medium"  # below this, `check_isolation` refuses unless unsafe_exec


@dataclass
class Result:
    passed: bool
    status: str  # 'passed' | 'failed' (non-zero exit) | 'timeout' | 'error' (killed by a signal)
    stderr_tail: str
    pgid: int = 0  # the launcher's process group (= its pid); gone by the time run_code returns
    stdout_tail: str = ""


@dataclass(frozen=True)
class Setup:
    """How `run_code` contains a program here: what the probe found, one field per layer."""

    prefix: tuple[str, ...] = ()  # unshare (and setpriv) command prefix, or none
    namespaces: bool = False  # prefix gives network + PID namespaces
    python: str = sys.executable  # interpreter for the program (nobody must reach it to drop)
    uid: int | None = None  # the program's uid when dropped (NOBODY), else it runs as ours
    setuid_in_child: bool = False  # the launcher drops the uid (not setpriv inside the prefix)
    seccomp: bool = False  # the BPF filter below installs here
    subreaper: bool = True  # PR_SET_CHILD_SUBREAPER works here
    root: bool = False  # we are root: without a uid drop the program would be root too


@dataclass(frozen=True)
class Isolation:
    level: str  # 'strong' | 'medium' | 'weak'
    mechanisms: tuple[str, ...]  # layers in force
    gaps: tuple[str, ...]  # what the program can still do here, in words

    def as_dict(self) -> dict:
        return {"level": self.level, "mechanisms": list(self.mechanisms), "gaps": list(self.gaps)}

    def __str__(self) -> str:
        return f"{self.level} ({', '.join(self.mechanisms)})"


# --- seccomp: a classic BPF program, assembled by hand

# syscall numbers: x86_64 (asm/unistd_64.h) and the generic table aarch64 uses
_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}  # AUDIT_ARCH_*
_NR = {
    "x86_64": {
        "socket": 41, "io_uring_setup": 425, "ptrace": 101, "process_vm_readv": 310,
        "process_vm_writev": 311, "pidfd_getfd": 438, "tkill": 200, "rt_sigqueueinfo": 129,
        "rt_tgsigqueueinfo": 297, "pidfd_send_signal": 424,
        "kill": 62, "tgkill": 234, "prlimit64": 302, "fcntl": 72, "ioctl": 16,  # by argument
    },
    "aarch64": {
        "socket": 198, "io_uring_setup": 425, "ptrace": 117, "process_vm_readv": 270,
        "process_vm_writev": 271, "pidfd_getfd": 438, "tkill": 130, "rt_sigqueueinfo": 138,
        "rt_tgsigqueueinfo": 240, "pidfd_send_signal": 424,
        "kill": 129, "tgkill": 131, "prlimit64": 261, "fcntl": 25, "ioctl": 29,
    },
}  # fmt: skip
# fcntl F_SETOWN, F_SETOWN_EX and ioctl FIOSETOWN, SIOCSPGRP: name a process to receive SIGIO
# (F_SETSIG can make it SIGKILL), checked only against the uid: a signal by the back door
_SET_OWNER = (8, 15, 0x8901, 0x8902)
_LD_W_ABS, _JEQ, _JGE, _RET = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, JMP|JEQ|K, JMP|JGE|K, RET|K
_ALLOW, _EPERM = 0x7FFF0000, 0x00050000 | 1  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EPERM
_X32 = 0x40000000  # x86_64 syscalls with this bit are the x32 ABI: a second table to refuse
PR_GET_DUMPABLE, PR_SET_DUMPABLE, PR_SET_SECCOMP = 3, 4, 22
PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 36, 38


def seccomp_filter(self_pid: int, machine: str | None = None) -> bytes | None:
    """The filter as packed `struct sock_filter`s, or None on an architecture we have no table
    for. Reads `struct seccomp_data` (nr at offset 0, arch at 4, args[i] at 16 + 8 i, low word
    first): kill and tgkill may target only `self_pid` (unshare re-raises its child's signal
    on itself), prlimit64 only the caller (pid 0, as setrlimit does) or `self_pid`: a same-uid
    program could otherwise set the evaluator's RLIMIT_CPU to 1 second; fcntl and ioctl may
    not set a signal owner; the other listed calls fail with EPERM; the rest is allowed."""
    machine = machine or platform.machine()
    if machine not in _NR:
        return None
    nr = _NR[machine]
    denied = [nr[n] for n in nr if n not in ("kill", "tgkill", "prlimit64", "fcntl", "ioctl")]
    prog: list = [  # (code, jump-if-true label or 0, jump-if-false label or 0, k) and labels
        (_LD_W_ABS, 0, 0, 4),
        (_JEQ, 0, "deny", _ARCH[machine]),  # another ABI (i386 via int 0x80): refuse it all
        (_LD_W_ABS, 0, 0, 0),
        (_JEQ, "self", 0, nr["kill"]),
        (_JEQ, "self", 0, nr["tgkill"]),
        (_JEQ, "caller", 0, nr["prlimit64"]),
        (_JEQ, "owner", 0, nr["fcntl"]),
        (_JEQ, "owner", 0, nr["ioctl"]),
    ]
    if machine == "x86_64":
        prog.append((_JGE, "deny", 0, _X32))
    prog += [(_JEQ, "deny", 0, n) for n in denied]
    prog += [(_RET, 0, 0, _ALLOW), "self", (_LD_W_ABS, 0, 0, 16)]  # args[0]: the target pid
    prog += [(_JEQ, 0, "deny", self_pid), (_RET, 0, 0, _ALLOW)]
    prog += ["caller", (_LD_W_ABS, 0, 0, 16), (_JEQ, "allow", 0, 0), (_JEQ, 0, "deny", self_pid)]
    prog += ["allow", (_RET, 0, 0, _ALLOW)]
    prog += ["owner", (_LD_W_ABS, 0, 0, 24)]  # args[1]: the command
    prog += [(_JEQ, "deny", 0, cmd) for cmd in _SET_OWNER]
    prog += [(_RET, 0, 0, _ALLOW), "deny", (_RET, 0, 0, _EPERM)]
    labels, code = {}, []
    for item in prog:
        if isinstance(item, str):
            labels[item] = len(code)
        else:
            code.append(item)

    def offset(at: int, target) -> int:  # jumps are relative to the next instruction
        return 0 if target == 0 else labels[target] - at - 1

    return b"".join(
        struct.pack("HBBI", c, offset(i, jt), offset(i, jf), k)
        for i, (c, jt, jf, k) in enumerate(code)
    )


def _prctl(option: int, arg: int) -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) == 0


def install_seccomp() -> None:
    """Load the filter into this process (inherited by every child, for good). no_new_privs
    first: it lets an unprivileged process load a filter, and stops setuid binaries gaining
    privileges inside the sandbox."""
    prog = seccomp_filter(os.getpid())
    if prog is None:
        raise OSError(f"no seccomp syscall table for {platform.machine()}")
    buf = ctypes.create_string_buffer(prog, len(prog))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(prog) // 8, ctypes.addressof(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    if not _prctl(PR_SET_NO_NEW_PRIVS, 1):
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(PR_SET_SECCOMP, 2, ctypes.byref(fprog), 0, 0) != 0:  # SECCOMP_MODE_FILTER
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


# --- the launcher: this file run as a script, outside the sandbox


def _set_limits(limits: dict) -> None:
    for name, value in limits.items():
        resource.setrlimit(getattr(resource, name), (value, value))


def _exec_program(cfg: dict) -> None:
    """In the launcher's child: limits, uid, filter, then the program. Never returns."""
    try:
        os.dup2(cfg["out_fd"], 1)
        os.close(cfg["out_fd"])
        _set_limits(cfg["limits"])
        if cfg["uid"] is not None:
            os.setgroups([])
            os.setresgid(cfg["uid"], cfg["uid"], cfg["uid"])
            os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])
        if cfg["seccomp"]:
            install_seccomp()
        os.execv(cfg["cmd"][0], cfg["cmd"])
    except BaseException as e:  # noqa: BLE001 - the parent must hear of any failure
        os.write(2, f"sandbox: could not start the program: {e!r}\n".encode())
    os._exit(126)


def _wait(pid: int, timeout_s: float) -> tuple[str, int]:
    """('exited', code) | ('signaled', signal) | ('timeout', 0) of the launcher's child."""
    deadline = time.monotonic() + timeout_s
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        left = deadline - time.monotonic()
        if left <= 0:
            return "timeout", 0
        if pidfd is not None:
            select.select([pidfd], [], [], left)  # readable when the child exits
        else:
            time.sleep(min(left, 0.01))
    if os.WIFSIGNALED(status):
        return "signaled", os.WTERMSIG(status)
    return "exited", os.waitstatus_to_exitcode(status)


def _descendants(root: int) -> list[int]:
    """Every process below `root`, by the parent links in /proc."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])  # comm may hold spaces
            children.setdefault(ppid, []).append(int(name))
    found, todo = [], [root]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _kill_descendants(deadline: float) -> None:
    """SIGKILL and reap until this process has no child left. As a subreaper, every orphan
    below us is re-parented to us, so 'no child' means 'no descendant'."""
    while time.monotonic() < deadline:
        for pid in _descendants(os.getpid()):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            return
        time.sleep(0.005)


def _launch(cfg: dict) -> int:
    """Start the program, wait at most the timeout, kill everything it left, and print the
    verdict as one JSON line on stdout (a pipe the program does not hold)."""
    _prctl(PR_SET_DUMPABLE, 0)  # same-uid programs may not ptrace us or open /proc/PID/fd
    if cfg["subreaper"]:
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
    pid = os.fork()
    if pid == 0:
        _exec_program(cfg)
    os.close(cfg["out_fd"])
    how, value = _wait(pid, cfg["timeout_s"])
    _kill_descendants(time.monotonic() + KILL_GRACE_S)
    print(json.dumps({"how": how, "value": value}), flush=True)
    return 0


def _probe_layers() -> dict:
    """In a throwaway child: does the subreaper prctl work; does the filter load and deny?"""
    subreaper = _prctl(PR_SET_CHILD_SUBREAPER, 1)
    pid = os.fork()
    if pid == 0:
        import socket

        try:
            install_seccomp()
        except OSError:
            os._exit(1)
        for attempt in (lambda: socket.socket(), lambda: os.kill(os.getppid(), 0)):
            try:
                attempt()
                os._exit(1)
            except PermissionError:
                pass
        os.kill(os.getpid(), 0)  # signals to itself still work
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    return {"subreaper": subreaper, "seccomp": os.waitstatus_to_exitcode(status) == 0}


# --- probing the host: the strongest setup that works, once per process


def _world_reachable(path: str) -> bool:
    """Whether uid `nobody` can execute `path`: every parent directory must be o+x."""
    p = Path(os.path.realpath(path))
    if not p.exists():
        return False
    return all(os.stat(d).st_mode & 0o001 for d in p.parents) and bool(os.stat(p).st_mode & 0o001)


def _drop_uid() -> None:
    os.setgroups([])
    os.setresgid(NOBODY, NOBODY, NOBODY)
    os.setresuid(NOBODY, NOBODY, NOBODY)


def _runs(cmd: list[str], preexec=None) -> bool:
    try:
        r = subprocess.run(cmd, capture_output=True, timeout=10, cwd="/", preexec_fn=preexec)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0


@cache
def _setup() -> Setup:
    """The strongest setup that works here; each layer probed on its own."""
    unshare, setpriv = shutil.which("unshare"), shutil.which("setpriv")
    ns = ("--net", "--pid", "--fork", "--kill-child", "--mount-proc", "--")
    # nobody must be able to run the interpreter: a venv under /root is out of its reach, but
    # any Python 3 will do, as programs use the standard library only
    base = getattr(sys, "_base_executable", sys.executable)  # a venv's own interpreter
    pythons = (sys.executable, base, "/usr/bin/python3", "/usr/local/bin/python3")
    reachable = [p for p in pythons if _world_reachable(p)]
    can_drop = os.geteuid() == 0 and bool(reachable)
    python = reachable[0] if can_drop else sys.executable
    candidates = []  # (prefix, drops inside the prefix, drops in the launcher's child)
    if unshare and setpriv and can_drop:
        drop = (setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--")
        candidates.append(((unshare, *ns, *drop), True, False))
    if unshare:  # a user namespace: as nobody when we are root, else as ourselves
        candidates.append(((unshare, "--user", "--map-root-user", *ns), False, can_drop))
    candidates.append(((), False, can_drop))
    prefix, in_prefix, in_child = next(
        (prefix, in_prefix, in_child)
        for prefix, in_prefix, in_child in candidates
        if not prefix
        or _runs([*prefix, python, "-I", "-S", "-c", "pass"], _drop_uid if in_child else None)
    )
    try:
        probe = subprocess.run(
            [sys.executable, "-I", "-S", __file__, "--probe"], capture_output=True, timeout=30
        )
        layers = json.loads(probe.stdout)
    except (OSError, subprocess.SubprocessError, ValueError):
        layers = {}  # neither layer then: the level says so
    return Setup(
        prefix=prefix,
        namespaces=bool(prefix),
        python=python,
        uid=NOBODY if in_prefix or in_child else None,
        setuid_in_child=in_child,
        seccomp=layers.get("seccomp", False),
        subreaper=layers.get("subreaper", False),
        root=os.geteuid() == 0,
    )


def isolation(setup: Setup | None = None) -> Isolation:
    """The level and the layers `run_code` uses here. strong: network and PID namespaces and
    uid nobody; medium: network blocked (namespace or seccomp), the evaluator out of the
    program's reach (other uid, PID namespace or seccomp) and every orphan reaped (PID
    namespace or subreaper), and not as root; weak: anything less."""
    s = setup or _setup()
    ns, uid = s.namespaces, s.uid is not None
    mechanisms = ["rlimits", "clean environment", "process group kill"]
    mechanisms += ["subreaper"] * s.subreaper + ["uid nobody"] * uid
    mechanisms += ["network namespace", "pid namespace"] * ns
    mechanisms += ["seccomp (no sockets, no signals to other processes)"] * s.seccomp
    mechanisms += ["socket prelude (best effort)"] * (not (ns or s.seccomp))
    holes = {  # what is missing, and whether the medium level can do without it
        "network: only a Python-level block, which the program can undo": ns or s.seccomp,
        "evaluator: the program runs as our uid and can signal it": uid or ns or s.seccomp,
        "orphans: a program that calls setsid() can outlive the run": ns or s.subreaper,
        "root: the program runs as root (no Python that nobody can run)": uid or not s.root,
    }
    gaps = [gap for gap, closed in holes.items() if not closed]
    if not uid:
        gaps.append(
            "files: the program runs as the user's uid, so it can read, write and delete the "
            "user's files" + ("" if ns else " and reach the user's other processes via /proc")
        )
    level = "strong" if ns and uid else "medium" if all(holes.values()) else "weak"
    return Isolation(level, tuple(mechanisms), tuple(gaps))


def check_isolation(unsafe_exec: bool = False, minimum: str = MIN_LEVEL) -> Isolation:
    """The isolation in force; refuses (ConfigError) below `minimum` unless unsafe_exec."""
    iso = isolation()
    if LEVELS.index(iso.level) < LEVELS.index(minimum) and not unsafe_exec:
        from lmforge.config import (
            ConfigError,  # not at the top: this file also runs as a script (-I -S)
        )

        raise ConfigError(
            f"refusing to run model-written code: the sandbox here is only {iso.level!r} "
            f"(minimum {minimum!r}): {'; '.join(iso.gaps)}. Run where unshare or seccomp works "
            "(e.g. as root, or with user namespaces), or pass --unsafe-exec (in a recipe: "
            "eval.unsafe_exec: true) to accept the risk"
        )
    return iso


# --- running a program


def _limits(timeout_s: float, memory_mb: int, nproc: int) -> dict:
    cpu = math.ceil(timeout_s) + 1  # CPU seconds: a backstop behind the wall-clock timeout
    return {
        "RLIMIT_AS": memory_mb * 2**20,
        "RLIMIT_CPU": cpu,
        "RLIMIT_NPROC": nproc,
        "RLIMIT_FSIZE": 16 * 2**20,
        "RLIMIT_NOFILE": 64,
        "RLIMIT_CORE": 0,
    }


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
    """SIGKILL the launcher's group until no live process is left: the backstop for a launcher
    that was killed (same uid, no seccomp) or hung."""
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


@contextmanager
def _undumpable():
    """Make the evaluator non-dumpable while a program runs: a same-uid program could otherwise
    read our /proc/PID/environ and write our /proc/PID/mem (the ptrace access check, not the
    ptrace syscall the filter denies). Restored afterwards: it also disables core dumps."""
    libc = ctypes.CDLL(None)
    before = libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)
    _prctl(PR_SET_DUMPABLE, 0)
    try:
        yield
    finally:
        if before > 0:
            _prctl(PR_SET_DUMPABLE, before)


def _tail(f) -> str:
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - 2000))
    return f.read().decode("utf-8", "replace")


def _supervise(cfg: dict, workdir: str, env: dict, out, err, stdin: bytes, timeout_s: float):
    """Start the launcher, hand the program its stdin, read the verdict; kill what is left."""
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", __file__, json.dumps(cfg)],
        cwd=workdir,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=err,
        pass_fds=(out.fileno(),),
        start_new_session=True,
    )
    try:
        report, _ = proc.communicate(stdin, timeout=timeout_s + KILL_GRACE_S + 10)
        verdict = json.loads(report)  # nothing, if the program killed the launcher
    except (subprocess.TimeoutExpired, ValueError):
        verdict = {"how": "lost", "value": 0}  # the backstop below kills what is left
    _kill_group(proc)
    return verdict, proc


def run_code(
    program: str, timeout_s: float = 5.0, memory_mb: int = 512, stdin: bytes = b""
) -> Result:
    """Run `program` (stdlib-only Python) in the sandbox, `stdin` on its standard input;
    passed = it exited with status 0 in time (HumanEval asks more: see generative.py)."""
    s = _setup()
    nproc = MAX_PROCS if s.uid is not None else _user_tasks(os.getuid()) + MAX_PROCS
    if not (s.namespaces or s.seccomp):
        program = NO_NET_PRELUDE + program
    workdir = tempfile.mkdtemp(prefix="lmforge-sandbox-")
    try:
        if s.uid is not None:
            os.chown(workdir, s.uid, s.uid)
        Path(workdir, "program.py").write_text(program, encoding="utf-8")
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
        # files, not pipes: the program's output is bounded by RLIMIT_FSIZE
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            cfg = {
                "cmd": [*s.prefix, s.python, "-I", "-S", "program.py"],
                "timeout_s": timeout_s,
                "limits": _limits(timeout_s, memory_mb, nproc),
                "uid": s.uid if s.setuid_in_child else None,
                "seccomp": s.seccomp,
                "subreaper": s.subreaper,
                "out_fd": out.fileno(),
            }
            with _undumpable():
                verdict, proc = _supervise(cfg, workdir, env, out, err, stdin, timeout_s)
            how, value = verdict["how"], verdict["value"]
            if how == "timeout":
                status = "timeout"
            elif how == "exited":
                status = "passed" if value == 0 else "failed"
            else:  # killed by a signal, or the launcher itself was lost
                status = "error"
            stdout_tail, stderr_tail = _tail(out), _tail(err)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return Result(status == "passed", status, stderr_tail, proc.pid, stdout_tail)


if __name__ == "__main__":  # the launcher; run by run_code and _setup, not by hand
    if sys.argv[1:] == ["--probe"]:
        print(json.dumps(_probe_layers()))
        sys.exit(0)
    sys.exit(_launch(json.loads(sys.argv[1])))
