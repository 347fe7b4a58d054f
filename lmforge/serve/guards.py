"""What keeps `lmforge serve` answering when requests are hostile or merely slow: the Host
check (DNS rebinding), chat templates rendered off the event loop under a time limit, and
uvicorn's HTTP protocol with a connection limit and a deadline for each request's headers.

The one idea: every wait a client or a model file can stretch has a deadline, and everything a
client can hold (connections, template threads) has a count; past either, the server drops
that one thing with one log line and goes on serving the others.
"""

from __future__ import annotations

import asyncio
import ctypes
import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Iterable

log = logging.getLogger("lmforge.serve")

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


# --------------------------------------------------------------------------- the Host header


def is_loopback(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(bound_host: str, allowed: Iterable[str] | None) -> frozenset[str] | None:
    """The Host names the server answers to (None = any). `allowed` (from --allowed-hosts,
    "*" = any) replaces the default, which is the loopback names when bound to a loopback
    address and any name otherwise (clients reach 0.0.0.0 by names we cannot know). The bound
    address itself is always allowed."""
    names = {h.strip().lower().strip("[]").rstrip(".") for h in allowed or () if h.strip()}
    if "*" in names:
        return None
    if allowed is None:
        if not is_loopback(bound_host):
            return None
        names.update(LOOPBACK_NAMES)
    if bound_host not in ("0.0.0.0", "::", ""):
        names.add(bound_host.lower().strip("[]"))
    return frozenset(names)


def host_name(header: str) -> str:
    """'LocalHost:8000' -> 'localhost', '[::1]:8000' -> '::1' (the port is not checked: a
    rebinding attack uses the attacker's name, whatever the port)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rpartition(":")[0] if header.count(":") == 1 else header.rstrip(".")


class HostCheck:
    """ASGI middleware: a request whose Host header is not an allowed name gets 400. A web
    page on evil.example can make its name resolve to 127.0.0.1 (DNS rebinding) and then read
    this server's answers as same-origin; its requests still say `Host: evil.example`.
    `allowed()` is read per request: `serve()` fixes the bound address after the app is made."""

    def __init__(self, app, allowed: Callable[[], frozenset[str] | None], error):
        self.app, self.allowed, self.error = app, allowed, error

    async def __call__(self, scope, receive, send):
        names = self.allowed() if scope["type"] == "http" else None
        if names is not None:
            header = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if header and host_name(header).rstrip(".") not in names:
                response = self.error(header, sorted(names))
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


# --------------------------------------------------------------------------- chat templates


class RenderTimeout(BaseException):
    """Raised inside a render thread that ran past its limit. A BaseException, so that an
    `except Exception` in code the template calls cannot swallow it."""


class RenderBusy(Exception):
    """Every render slot is taken (by renders that could not be stopped)."""


# two prototypes of one C function: an exception class raises it, NULL clears a pending one
_ASYNC_EXC = ("PyThreadState_SetAsyncExc", ctypes.pythonapi)
_set_async_exc = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.py_object)(_ASYNC_EXC)
_clear_async_exc = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)(_ASYNC_EXC)


class _Job:
    def __init__(self, fn, loop):
        self.fn, self.loop = fn, loop
        self.future: asyncio.Future = loop.create_future()
        self.ident: int | None = None
        self.running, self.killed = True, False


class TemplateRenderer:
    """Runs a function (a chat template render) in a thread of its own, at most `slots` at
    once, under a time limit. Off the event loop, because a template is code from the model's
    files and may loop for ever; the loop must keep serving the other requests and SIGTERM.

    Why a killable thread and not a subprocess: the render needs the tokenizer (loaded once,
    not picklable cheaply), and a worker process forked from a server whose engine thread is
    inside torch can deadlock. A thread past the limit is stopped by raising RenderTimeout in it
    (PyThreadState_SetAsyncExc): Python checks for it at every loop iteration and call, which a
    Jinja loop, compiled to Python, goes through. A thread stuck in one long C call (a huge
    string repeat) only sees it when the call returns; until then it keeps its slot, so such
    templates can take at most `slots` threads, after which renders get RenderBusy (503)."""

    def __init__(self, slots: int = 2, timeout: float = 10.0, wait: float = 2.0):
        self.slots, self.timeout, self.wait = slots, timeout, wait
        self.busy = 0
        self._lock = threading.Lock()

    async def __call__(self, fn: Callable[[], object]):
        """fn() run in a render thread; RenderTimeout past the limit, RenderBusy when every slot
        stays full for `wait` seconds (a burst of clients waits its turn; stuck templates don't
        make requests pile up)."""
        job = _Job(fn, asyncio.get_running_loop())
        deadline = time.monotonic() + self.wait
        while True:
            with self._lock:
                if self.busy < self.slots:
                    self.busy += 1
                    break
            if time.monotonic() >= deadline:
                raise RenderBusy(f"all {self.slots} chat-template threads are busy")
            await asyncio.sleep(0.005)
        thread = threading.Thread(target=self._main, args=(job,), daemon=True, name="render")
        thread.start()
        job.ident = thread.ident
        try:
            return await asyncio.wait_for(job.future, self.timeout)
        except asyncio.TimeoutError:
            self._kill(job)
            raise RenderTimeout(f"the chat template took over {self.timeout:g} s") from None
        except BaseException:  # cancelled (the client left): stop the render too
            self._kill(job)
            raise

    def _kill(self, job: _Job) -> None:
        with self._lock:  # only while the job runs, and once: see _finish
            if job.running and not job.killed:
                job.killed = True
                _set_async_exc(job.ident, RenderTimeout)

    def _main(self, job: _Job) -> None:
        try:
            self._work(job)
        except RenderTimeout:  # the kill landed after the render itself had returned
            self._finish(job, None, RenderTimeout())

    def _work(self, job: _Job) -> None:
        try:
            result, error = job.fn(), None
        except (RenderTimeout, Exception) as e:
            result, error = None, e
        self._finish(job, result, error)

    def _finish(self, job: _Job, result, error) -> None:
        """Idempotent bookkeeping: a kill may arrive at most once, anywhere before the clear
        below (taken under the lock that _kill holds), and _main then calls this again. Inside
        the lock nothing but the clear itself calls a function, where a kill could land."""
        me = threading.get_ident()
        with self._lock:
            if not job.running:
                return
            job.running = False
            self.busy -= 1
            _clear_async_exc(me, None)  # a kill fired as the render ended
        try:
            job.loop.call_soon_threadsafe(_resolve, job.future, result, error)
        except RuntimeError:  # the event loop has closed: nobody is waiting
            pass


def _resolve(future: asyncio.Future, result, error) -> None:
    if future.done():  # timed out or cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


# --------------------------------------------------------------------------- connections


def guarded_http_protocol(max_connections: int, timeout: float):
    """uvicorn's h11 protocol with what uvicorn lacks: a connection past `max_connections`
    open ones is answered 503 and closed at once, and a connection that has not sent a whole
    request header within `timeout` seconds (of opening, or of its previous response) is
    closed with a 408. Without them each half-sent request holds a file descriptor for ever
    and ~1,000 of them stop the server accepting anyone. The body is the app's business (it
    reads it against the same deadline); here a connection with a request in the app is left
    alone. Pass the class as uvicorn.Config(http=...); h11 is used even if httptools is
    installed."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._deadline = None
            if len(self.connections) > max_connections:
                self._drop(
                    f"refused: {max_connections} connections are already open (--max-connections)",
                    b"503 Service Unavailable",
                )
            else:
                self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request on this keep-alive connection

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(timeout, self._expire)

        def _disarm(self) -> None:
            if getattr(self, "_deadline", None) is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            if self.cycle is not None and not self.cycle.response_complete:
                return  # a request is in the app, which has its own deadline for the body
            if self.conn.their_state is h11.IDLE:
                got = len(self.conn.trailing_data[0])
                why = f"no complete request header within {timeout:g} s ({got} bytes of it)"
            else:  # the rest of a request whose answer has gone (a 413 stops reading)
                why = f"the rest of the request did not arrive within {timeout:g} s"
            status = b"408 Request Timeout" if self.conn.our_state is h11.IDLE else None
            self._drop(f"dropped: {why}", status)

        def _drop(self, why: str, status: bytes | None) -> None:
            """One log line, a bodiless answer when nothing was sent yet, and close."""
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
            log.warning("connection from %s %s", client, why)
            if status is not None:
                head = b"HTTP/1.1 " + status + b"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                self.transport.write(head)
            self.transport.close()

    return GuardedH11Protocol
