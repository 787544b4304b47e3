"""A unit of work a widget runs off the kernel's main thread: cancellable between steps, its end kept.

The work calls :meth:`BackgroundJob.step` after each step (a batch); once :meth:`~BackgroundJob.cancel`
was asked for, ``step`` raises :class:`Cancelled`, which unwinds the work (``with`` blocks close, so
capture hooks come off) and marks the job cancelled. Any other exception is kept in ``error``. The
kernel stays free while the thread runs: torch releases the GIL in its kernels. (Compare
:func:`widgets.background.await_in_thread`, for work a cell awaits until it ends; a job here runs while
the cell that started it has long finished, as a button's work does.)
"""
from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable


class Cancelled(Exception):
    """Raised by :meth:`BackgroundJob.step` once a cancel was asked for."""


@dataclasses.dataclass
class BackgroundJob:
    """One run of a function: steps done of ``total_steps``, and how it ended (``result``, ``error`` or
    ``cancelled``).

    Example:
        >>> job = BackgroundJob(total_steps=3)
        >>> def work(job):
        ...     for step in range(1, 4):
        ...         job.step(step)
        ...         job.cancel()          # as if Cancel were pressed during the first step
        ...     return "finished"
        >>> job.run(work)
        >>> job.cancelled, job.steps, job.result
        (True, 2, None)
    """

    total_steps: int | None = None
    cancel_requested: threading.Event = dataclasses.field(default_factory=threading.Event)
    started: float = dataclasses.field(default_factory=time.perf_counter)
    steps: int = 0
    result: object = None
    error: BaseException | None = None
    cancelled: bool = False
    thread: threading.Thread | None = None

    def run(self, work: Callable[[BackgroundJob], object]) -> None:
        """Run ``work(self)`` in this thread; its return value becomes ``result``. Never raises:
        :class:`Cancelled` marks the job cancelled, any other exception (KeyboardInterrupt too) is kept."""
        try:
            self.result = work(self)
        except Cancelled:
            self.cancelled = True
        except BaseException as error:  # KeyboardInterrupt too: the caller decides what it means
            self.error = error

    def start(self, target: Callable[..., None], *args: object, name: str = "widget job") -> threading.Thread:
        """Run ``target(*args)`` (which calls :meth:`run`) in a daemon thread; returns the thread."""
        self.thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self.thread.start()
        return self.thread

    def step(self, steps: int) -> None:
        """Record ``steps`` done; raise :class:`Cancelled` if a cancel was asked for."""
        self.steps = steps
        if self.cancel_requested.is_set():
            raise Cancelled

    def cancel(self) -> None:
        """Ask the work to stop at its next :meth:`step`."""
        self.cancel_requested.set()

    @property
    def seconds(self) -> float:
        """Seconds since the job was made."""
        return time.perf_counter() - self.started

    def wait(self, timeout: float | None = None) -> object:
        """Join the thread; the result (``None`` if cancelled), or re-raise the work's error.
        ``TimeoutError`` if the thread is still running after ``timeout`` seconds."""
        if self.thread is not None:
            self.thread.join(timeout)
            if self.thread.is_alive():
                raise TimeoutError(f"the {self.thread.name} is still running after {timeout} s")
        if self.error is not None:
            raise self.error
        return None if self.cancelled else self.result
