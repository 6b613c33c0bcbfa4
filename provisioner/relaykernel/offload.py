"""Run one blocking call off the event loop, bounded by a timeout."""

from __future__ import annotations

import asyncio
import functools
from typing import Any, Callable, TypeVar

from .errors import OperationTimeout

T = TypeVar("T")


async def run_blocking(
    func: Callable[..., T], *args: Any, timeout_seconds: float, what: str, **kwargs: Any
) -> T:
    """Run ``func(*args, **kwargs)`` in a worker thread; raise OperationTimeout after ``timeout_seconds``.

    The worker is not interrupted on timeout (threads cannot be), so every blocking call passed here
    also carries its own socket or channel timeout; this bound is what keeps the event loop's caller
    from waiting forever.
    """
    call = functools.partial(func, *args, **kwargs)
    try:
        return await asyncio.wait_for(asyncio.to_thread(call), timeout_seconds)
    except asyncio.TimeoutError:
        msg = f"{what} did not finish within {timeout_seconds:g} s"
        raise OperationTimeout(msg) from None
