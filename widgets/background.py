"""Run blocking work (a ``fit``, a comparison) in a worker thread while a notebook cell awaits it, so the
kernel keeps handling widget events — a Stop button's click — during training.

Why a thread: while a cell runs plain blocking code, ipykernel handles no widget (comm) messages, so a
click arrives only after the cell ends. Measured with ipykernel 7.4 and JupyterLab 4.6: a click during a
15 s blocking loop reached its handler after the loop; ``jupyter-ui-poll`` 1.1.0 changes nothing there
(it calls ``kernel.do_one_iteration``, which ipykernel 7.4 no longer has, and swallows the error);
JupyterLab's "comms over subshells" did not route the widget's messages past the busy main shell. While
a cell *awaits*, ipykernel runs its event loop and dispatches comm messages at once, so the click handler
runs while the worker trains.

Ctrl-C (the kernel's interrupt) during such a cell cancels the awaiting cell; :func:`await_in_thread`
turns that into ``on_cancel()`` (the monitor asks the run to stop, reason ``"KeyboardInterrupt"``) and
keeps waiting for the worker to finish its step and return, so the cell still gets the partial result.
A second Ctrl-C stops waiting (the worker, asked to stop, ends on its own).
"""
from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["await_in_thread"]

T = TypeVar("T")


async def await_in_thread(function: Callable[..., T], /, *args: Any, on_cancel: Callable[[], None] | None = None,
                          **kwargs: Any) -> T:
    """``function(*args, **kwargs)`` in a worker thread, awaited; a first cancellation calls ``on_cancel()``
    and keeps waiting for the result, a second one is raised.

    The worker runs in a copy of the caller's context (so a notebook's output goes to the awaiting cell).

    Example:
        >>> import asyncio, threading
        >>> asyncio.run(await_in_thread(lambda: threading.current_thread() is threading.main_thread()))
        False
    """
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()
    future = loop.run_in_executor(None, functools.partial(context.run, function, *args, **kwargs))
    cancelled = False
    while True:
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            if cancelled or future.done() or on_cancel is None:
                raise
            cancelled = True
            task = asyncio.current_task()
            if task is not None and hasattr(task, "uncancel"):  # Python 3.11+: this cancellation is handled
                task.uncancel()
            on_cancel()
