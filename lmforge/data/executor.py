"""Run independent tasks in parallel: a local process pool (the default) or Ray tasks on a cluster.

The one idea: `lmforge clean` only ever maps a pure function over small task descriptions (which
shard, which files) whose results are small dicts; the data itself goes from files to files. So the
executor is one function, `map_tasks`, yielding (task index, result) as tasks finish, and moving
from one machine to a cluster changes only where the function runs. Every task writes its files
atomically, so a task that dies, or an executor killed half way, leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait


def map_tasks(
    fn: Callable, tasks: list, executor: str = "local", num_workers: int = 1, address: str = ""
) -> Iterator[tuple[int, object]]:
    """(index, fn(tasks[index])) for every task, in order of completion."""
    if not tasks:
        return
    if executor == "ray":
        yield from _map_ray(fn, tasks, num_workers, address)
    elif num_workers <= 1 or len(tasks) == 1:
        for i, task in enumerate(tasks):  # in this process: plain tracebacks, no pickling
            yield i, fn(task)
    else:
        yield from _map_pool(fn, tasks, num_workers)


def _map_pool(fn: Callable, tasks: list, num_workers: int) -> Iterator[tuple[int, object]]:
    # fork on Linux, as the tokenizing workers of `prepare` do: no __main__ guard needed, and the
    # workers only run numpy and pure Python. Elsewhere fork is unsafe; use the default, spawn.
    ctx = mp.get_context("fork" if sys.platform == "linux" else None)
    pool = ProcessPoolExecutor(min(num_workers, len(tasks)), mp_context=ctx)
    try:
        futures = {pool.submit(fn, task): i for i, task in enumerate(tasks)}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in sorted(done, key=futures.get):
                yield futures[f], f.result()  # a worker's exception is raised here, as is
    finally:
        # Ctrl-C or an error: drop queued tasks; running ones finish their (atomic) shard
        pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def session(executor: str = "local", num_workers: int = 1, address: str = ""):
    """Keep one Ray connection for every `map_tasks` inside (starting Ray costs seconds)."""
    if executor != "ray":
        yield
        return
    ray = _ray()
    started = not ray.is_initialized()
    if started:
        # a local instance when no address is given; its workers must import lmforge, so they
        # get this process's import path (on a cluster, install lmforge on every node instead)
        kwargs = {"address": address} if address else {"num_cpus": num_workers}
        ray.init(
            **kwargs,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}},
        )
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def _ray():
    try:
        import ray
    except ImportError:
        raise ImportError("executor: ray needs Ray: pip install 'lmforge[ray]'") from None
    return ray


def _map_ray(fn: Callable, tasks: list, num_workers: int, address: str):
    ray = _ray()
    with session("ray", num_workers, address):
        remote = ray.remote(num_cpus=1, max_retries=2)(fn)
        refs = {remote.remote(task): i for i, task in enumerate(tasks)}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                yield refs[ref], ray.get(ref)
