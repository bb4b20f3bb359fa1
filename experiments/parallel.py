"""A search or a sweep on the CPU: one job per core, one thread per job.

The jobs of the MNIST experiments are independent, and their operations are small (a 128-image batch through a
64-wide MLP or a 32-wide transformer): two threads split one such operation badly, while two processes on two
cores run two jobs at full speed (bench/README.md, "Where the time goes"). One thread per job also fixes the
numbers: a job gives the same bits alone or beside others, on 2 cores or 16.

    LORA_WORKERS=N   run N jobs at a time (default: the cores this process may use)
"""

import concurrent.futures
import contextlib
import multiprocessing
import os
import signal
from collections.abc import Callable, Iterator

import torch


def default_workers() -> int:
    """LORA_WORKERS where set, else the cores this process may run on."""
    value = os.environ.get("LORA_WORKERS")
    if value is None:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"LORA_WORKERS must be a positive integer, got {value!r}")
    return int(value)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Torch's intra-op threads set to 1 inside, and put back after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_pool: tuple[int, concurrent.futures.ProcessPoolExecutor] | None = None  # kept: a process takes seconds to start


def pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    """`workers` spawned processes of one thread each, started once and reused by every later call."""
    global _pool
    if _pool is None or _pool[0] != workers:
        if _pool is not None:
            _pool[1].shutdown()
        # spawn, not fork: a forked child of a process whose OpenMP threads have run can hang
        _pool = (workers, concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker))
    return _pool[1]


def _start_worker() -> None:
    """One thread; Ctrl-C (or a kernel's interrupt) goes to the caller, which cancels what has not started and
    lets running jobs finish and save, rather than killing them half-way."""
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_each(fn: Callable, calls: list[tuple], workers: int, done: Callable[[int], None]) -> list:
    """[fn(*args) for args in calls], `workers` at a time in other processes (here, on one thread, when
    workers is 1); done(i) after call i finishes, in the order they finish. If done or a call raises, the calls
    not yet started are cancelled and the running ones finish before the exception goes on: none is left
    running, or half-written, behind the caller's back."""
    if workers == 1 or len(calls) <= 1:
        results = []
        for i, args in enumerate(calls):
            with one_thread():
                results.append(fn(*args))
            done(i)
        return results
    futures = [pool(workers).submit(fn, *args) for args in calls]
    index = {f: i for i, f in enumerate(futures)}
    try:
        for f in concurrent.futures.as_completed(futures):
            f.result()  # a job's exception, raised here
            done(index[f])
    except BaseException:
        for f in futures:
            f.cancel()
        concurrent.futures.wait(futures)
        raise
    return [f.result() for f in futures]
