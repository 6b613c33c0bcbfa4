"""Run one blocking call off the event loop, bounded by a timeout."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from typing import Any, Callable, TypeVar

from .common.errors import OperationTimeout

T = TypeVar("T")


async def run_blocking(
    func: Callable[..., T], *args: Any, timeout_seconds: float, what: str, **kwargs: Any
) -> T:
    """Run ``func(*args, **kwargs)`` in a thread of its own; raise OperationTimeout after ``timeout_seconds``.

    The worker is not interrupted on timeout (threads cannot be), so every blocking call passed here
    also carries its own socket or channel timeout; this bound is what keeps the event loop's caller
    from waiting forever. A thread of its own rather than the loop's executor: clients shut kernels
    down from atexit handlers (``jupyter run``), when executors no longer take work.
    """
    call = functools.partial(func, *args, **kwargs)
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    future.add_done_callback(lambda done: done.cancelled() or done.exception())  # no "never retrieved" noise
    worker = threading.Thread(target=_settle, args=(loop, future, call), name="relaykernel-blocking", daemon=True)
    try:
        worker.start()
    except RuntimeError:  # no new threads at all this late in shutdown: nothing else runs on the loop anyway
        return call()
    try:
        return await asyncio.wait_for(asyncio.shield(future), timeout_seconds)
    except asyncio.TimeoutError:
        msg = f"{what} did not finish within {timeout_seconds:g} s"
        raise OperationTimeout(msg) from None


def _settle(loop: asyncio.AbstractEventLoop, future: asyncio.Future[T], call: Callable[[], T]) -> None:
    try:
        result = call()
    except BaseException as error:  # handed to the awaiting coroutine, whatever it is
        _hand_over(loop, _fail, future, error)
    else:
        _hand_over(loop, _succeed, future, result)


def _hand_over(loop: asyncio.AbstractEventLoop, setter: Callable[..., None], *args: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the loop closed after the caller gave up waiting: nobody to tell
        loop.call_soon_threadsafe(setter, *args)


def _succeed(future: asyncio.Future[T], result: T) -> None:
    if not future.done():
        future.set_result(result)


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
