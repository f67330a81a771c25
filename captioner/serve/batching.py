"""The server's dynamic batching, built on LitServe's public API: requests are handled one by one (an async
`LitAPI`, one request per call), and `RequestBatcher` gathers the requests that arrive together into one model call.

Each request is decoded and checked on its own and answered on its own, so a bad upload or an out-of-range setting
gets its own 4xx while its neighbours get their captions; only requests that decoded reach the model. A batch
waits at most `timeout` for more requests after its first, holds at most `max_size`, and runs in a thread of its
own while the next batch gathers (the event loop keeps accepting). A batch that fails as a whole answers each of
its requests with the error; a client that went away leaves its neighbours' answers alone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

log = logging.getLogger("captioner")


class RequestBatcher:
    """Gather requests that arrive together into batches for `run` (see the module docstring).

    Args:
        run: Captions a batch: a list of decoded requests -> one result per request (a result, or the exception that
            answers that request).
        max_size: Most requests in one batch.
        timeout: Seconds a batch waits for more requests after its first.
    """

    def __init__(self, run: Callable[[list[Any]], list[Any]], max_size: int = 16, timeout: float = 0.01) -> None:
        self.run, self.max_size, self.timeout = run, max(1, max_size), max(0.0, timeout)
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self._model = ThreadPoolExecutor(1, thread_name_prefix="captioner-model")  # one batch on the model at a time

    async def submit(self, request: Any) -> Any:
        """The result of one request, once its batch has run.

        Raises:
            The exception `run` gave this request (or the batch).
        """
        if self._queue is None:  # made in the event loop that serves the requests
            self._queue = asyncio.Queue()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._work(), name="captioner-batcher")
        answer = asyncio.get_running_loop().create_future()
        await self._queue.put((request, answer))
        return await answer

    async def _gather(self) -> list[tuple[Any, asyncio.Future]]:
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        deadline = loop.time() + self.timeout
        while len(batch) < self.max_size:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return [(request, answer) for request, answer in batch if not answer.done()]  # gone: not captioned

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self._model, self.run, [request for request, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"the batch gave {len(results)} answers for {len(batch)} requests")
            except Exception as error:  # a fault of the batch as a whole: every request in it is told
                log.error(
                    "Captioning a batch of %d requests failed: %s: %s",
                    len(batch),
                    type(error).__name__,
                    error,
                    exc_info=error,
                )
                results = [error] * len(batch)
            for (_, answer), result in zip(batch, results):
                if answer.done():  # the client went away meanwhile
                    continue
                if isinstance(result, BaseException):
                    answer.set_exception(result)
                else:
                    answer.set_result(result)
