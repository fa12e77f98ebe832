"""Killable worker processes with a hard wall-clock timeout per item.

Verification of model output is untrusted input (docs/recipes.md §4: math-verify's
SIGALRM timeout does nothing off the main thread, and a hung check froze whole RL jobs
in a peer system). WorkerPool runs a function in separate processes, one item in flight
per worker, and SIGKILLs a worker whose item overruns its timeout, then starts a fresh
one; the other items are unaffected. The parent uses no signals, so it works from any thread.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import resource
import signal
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any, Callable, Iterable, Literal

START_TIMEOUT = 120.0  # seconds a new worker may take to import and warm up
_CTX = mp.get_context("spawn")  # fork is unsafe in a parent that runs torch threads
_IN_WORKER = False


def in_worker() -> bool:
    """True inside a WorkerPool worker process."""
    return _IN_WORKER


@dataclass
class Outcome:
    """What became of one item: its value, or why there is none."""

    status: Literal["ok", "timeout", "error"]
    value: Any = None
    error: str | None = None
    seconds: float = 0.0


def _worker_main(conn, fn: Callable, memory_mb: int | None, initializer: Callable | None) -> None:
    """Worker loop: receive (index, item), send back (index, status, value, error)."""
    global _IN_WORKER
    _IN_WORKER = True
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if memory_mb:  # a runaway sympy computation then fails with MemoryError instead of eating the machine
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = memory_mb * 2**20 if hard == resource.RLIM_INFINITY else min(memory_mb * 2**20, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    if initializer is not None:
        initializer()
    conn.send("ready")  # the parent starts no clock before this
    while True:
        try:
            msg = conn.recv()
        except EOFError:  # the parent is gone
            return
        if msg is None:
            return
        index, item = msg
        try:
            reply = (index, "ok", fn(item), None)
        except Exception as e:
            reply = (index, "error", None, f"{type(e).__name__}: {e}")
        try:
            conn.send(reply)
        except Exception as e:  # an unpicklable result
            conn.send((index, "error", None, f"cannot send result: {type(e).__name__}: {e}"))


class _Worker:
    """One worker process and the parent's end of its pipe."""

    def __init__(self, fn, memory_mb, initializer):
        self.conn, child = _CTX.Pipe()
        self.proc = _CTX.Process(target=_worker_main, args=(child, fn, memory_mb, initializer), daemon=True)
        self.proc.start()
        child.close()  # so the parent sees EOF when the worker dies
        self.started = time.monotonic()
        self.ready = False
        self.job: tuple[int, float] | None = None  # (item index, send time) while busy

    def stop(self, kill: bool) -> None:
        if not kill:
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.proc.join(timeout=2.0)
        if self.proc.is_alive():
            self.proc.kill()  # SIGKILL: a hung C-level sympy loop ignores anything milder
            self.proc.join()
        self.conn.close()


class WorkerPool:
    """Run `fn(item)` in killable processes, `timeout` seconds of wall clock per item.

    `fn` (and `initializer`, run once per worker before it reports ready) must be
    picklable top-level functions. Each worker caps its address space at `memory_mb`.
    Workers are spawned, so a script that makes a pool needs the usual
    `if __name__ == "__main__":` guard.
    """

    def __init__(self, fn: Callable[[Any], Any], workers: int | None = None, timeout: float = 10.0,
                 memory_mb: int | None = 4096, initializer: Callable[[], None] | None = None):
        self.fn, self.timeout, self.memory_mb, self.initializer = fn, timeout, memory_mb, initializer
        self.size = max(1, workers or os.cpu_count() or 1)
        self._lock = threading.Lock()  # one map at a time per pool
        self._workers = [self._spawn() for _ in range(self.size)]
        self._closed = False

    def _spawn(self) -> _Worker:
        return _Worker(self.fn, self.memory_mb, self.initializer)

    def _replace(self, w: _Worker) -> None:
        w.stop(kill=True)
        self._workers[self._workers.index(w)] = self._spawn()

    def map(self, items: Iterable, on_result: Callable[[int, Outcome], None] | None = None,
            timeout: float | None = None) -> list[Outcome]:
        """Outcomes in input order; `on_result(index, outcome)` as each finishes.

        `timeout` overrides the pool's per-item timeout for this call.
        """
        items = list(items)
        limit = self.timeout if timeout is None else timeout
        out: list[Outcome | None] = [None] * len(items)
        todo = deque(range(len(items)))
        with self._lock:
            if self._closed:
                raise RuntimeError("WorkerPool is closed")
            try:
                while todo or any(w.job for w in self._workers):
                    self._dispatch(items, todo)
                    for i, outcome in self._collect(limit):
                        out[i] = outcome
                        if on_result is not None:
                            on_result(i, outcome)
            finally:
                for w in [w for w in self._workers if w.job]:  # abandoned by an exception
                    self._replace(w)
        return out

    def _dispatch(self, items: list, todo: deque) -> None:
        for w in list(self._workers):
            if not todo:
                return
            if not w.ready or w.job:
                continue
            i = todo.popleft()
            w.job = (i, time.monotonic())
            try:
                w.conn.send((i, items[i]))
            except OSError:  # died while idle: not this item's fault
                w.job = None
                todo.appendleft(i)
                self._replace(w)

    def _collect(self, limit: float, wake=None) -> list[tuple[int, Outcome]]:
        """Wait for the next reply, deadline or `wake` message; return the items that finished."""
        waiting = [w for w in self._workers if w.job or not w.ready]
        deadlines = [w.job[1] + limit if w.job else w.started + START_TIMEOUT for w in waiting]
        left = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
        by_conn = {w.conn: w for w in waiting}
        done = []
        for conn in wait([*by_conn, *([wake] if wake is not None else [])], timeout=left):
            if conn is wake:
                while wake.poll():
                    wake.recv()
                continue
            w = by_conn[conn]
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                done += self._died(w)
                continue
            if msg == "ready":
                w.ready = True
                continue
            index, status, value, error = msg
            done.append((index, Outcome(status, value, error, time.monotonic() - w.job[1])))
            w.job = None
        return done + self._expire(limit)

    def _died(self, w: _Worker) -> list[tuple[int, Outcome]]:
        w.proc.join()
        code = w.proc.exitcode
        if w.job is None:
            raise RuntimeError(f"WorkerPool worker failed to start (exit code {code}; its traceback is on "
                               "stderr). Workers are spawned: does the script lack an `if __name__ == '__main__':` guard?")
        index, sent = w.job
        outcome = Outcome("error", error=f"worker died (exit code {code})", seconds=time.monotonic() - sent)
        self._replace(w)
        return [(index, outcome)]

    def _expire(self, limit: float) -> list[tuple[int, Outcome]]:
        now, done = time.monotonic(), []
        for w in list(self._workers):
            if w.job and now - w.job[1] >= limit:
                index, sent = w.job
                self._replace(w)
                outcome = Outcome("timeout", error=f"no result after {limit:g}s", seconds=now - sent)
                done.append((index, outcome))
            elif not w.ready and now - w.started >= START_TIMEOUT:
                raise RuntimeError(f"WorkerPool worker not ready after {START_TIMEOUT:g}s")
        return done

    def close(self) -> None:
        """Stop every worker (politely, then SIGKILL). Idempotent."""
        with self._lock:
            for w in self._workers:
                w.stop(kill=False)
            self._workers = []
            self._closed = True

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Service:
    """A WorkerPool fed from any thread: `submit(item)` gives a Future of its Outcome.

    One dispatcher thread keeps every worker busy with whatever has been submitted, from
    whichever caller, so a hung item holds one worker until its timeout while the other
    workers, and the other callers' items, go on.
    """

    def __init__(self, pool: WorkerPool):
        self.pool = pool
        self._items: dict[int, tuple[Any, Future]] = {}
        self._todo: deque[int] = deque()
        self._next = 0
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = _CTX.Pipe(duplex=False)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="worker-service", daemon=True)
        self._thread.start()

    def submit(self, item: Any) -> Future:
        fut: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the worker service is closed")
            self._items[self._next] = (item, fut)
            self._todo.append(self._next)
            self._next += 1
        self._wake_w.send(None)
        return fut

    def pending(self) -> int:
        """Items submitted and not yet finished."""
        with self._lock:
            return len(self._items)

    def _run(self) -> None:
        pool = self.pool
        with pool._lock:
            try:
                while True:
                    with self._lock:
                        if self._closed and not self._items:
                            return
                        pool._dispatch({i: self._items[i][0] for i in self._todo}, self._todo)
                    for i, outcome in pool._collect(pool.timeout, self._wake_r):
                        with self._lock:
                            _, fut = self._items.pop(i)
                        fut.set_result(outcome)
            except BaseException as e:  # a worker that cannot start: every caller hears of it
                with self._lock:
                    self._closed = True
                    for _, fut in self._items.values():
                        fut.set_exception(e)
                    self._items.clear()

    def close(self) -> None:
        """Finish what was submitted, then stop the workers. Idempotent."""
        with self._lock:
            self._closed = True
        self._wake_w.send(None)
        self._thread.join()
        self.pool.close()
