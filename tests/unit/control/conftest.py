"""The control tests share one event loop (the routers' queues live on it); at the end of the
session its tasks (the routers' batching loops) are cancelled and it is closed."""

from __future__ import annotations

import asyncio

import pytest

from tests.unit.control import fakes


@pytest.fixture(scope="session", autouse=True)
def shared_loop():
    yield fakes.LOOP
    pending = asyncio.all_tasks(fakes.LOOP)
    for task in pending:
        task.cancel()

    async def cancelled():
        await asyncio.gather(*pending, return_exceptions=True)

    fakes.LOOP.run_until_complete(cancelled())
    fakes.LOOP.close()
