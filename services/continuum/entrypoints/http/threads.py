"""Blocking work (the service, the database) off the event loop, in one plain thread pool.

FastAPI runs a plain `def` route through anyio's `to_thread.run_sync`: a capacity limiter, a
per-loop worker registry and a `queue.Queue` whose `Condition` wake-up showed up as a tenth of
an API worker's CPU under load. A `ThreadPoolExecutor` hands work over on a C `SimpleQueue`.
Routes that command the service are `async` and `await in_thread(...)`: one hop per request.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

#: As many threads as anyio's default limiter allows: requests beyond it wait in the queue.
POOL_THREADS = 40
_pool = ThreadPoolExecutor(max_workers=POOL_THREADS, thread_name_prefix="api")


async def in_thread(function: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """`function(*args, **kwargs)` in the pool, with the caller's context variables."""
    context = contextvars.copy_context()
    call = functools.partial(context.run, function, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(_pool, call)
