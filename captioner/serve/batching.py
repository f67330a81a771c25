"""The server's batching loop: requests batched for the model, but decoded, validated and answered one by one.

LitServe's own batched loop runs `decode_request` for every request of a batch
inside one `try`, so one bad upload (or one out-of-range setting) answered the
whole batch with its error, and the decodes ran one after another. Here each
request's body is decoded and checked on its own, `decode_threads` at a time
(Pillow releases the GIL while it decodes), a request that fails gets its own
4xx with its own reason, and only the requests that decoded reach `predict`.
A `predict` row that is an exception answers that request alone, and so does a
response that cannot be encoded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import HTTPException
from litserve.callbacks import EventTypes
from litserve.loops.base import _StopLoopError
from litserve.loops.simple_loops import BatchedLoop
from litserve.utils import LitAPIStatus, LoopResponseType, PickleableHTTPException

log = logging.getLogger("captioner")


def decode_each(decode: Callable[[Any], Any], payloads: Sequence[Any], pool: ThreadPoolExecutor | None) -> list[Any]:
    """`decode(payload)` for every payload, in `pool`'s threads when given: each result, or the exception it raised.

    Args:
        decode: Decodes and validates one request.
        payloads: The requests of a batch.
        pool: Threads to decode in (None: one after another, here).
    """

    def attempt(payload: Any) -> Any:
        try:
            return decode(payload)
        except Exception as error:  # each request's own failure, answered on its own
            return error

    if pool is None or len(payloads) < 2:
        return [attempt(payload) for payload in payloads]
    return list(pool.map(attempt, payloads))


class IsolatingBatchedLoop(BatchedLoop):
    """LitServe's `BatchedLoop` with every request decoded and answered on its own (see the module docstring).

    Args:
        decode_threads: Requests of a batch decoded at once.
    """

    def __init__(self, decode_threads: int = 1) -> None:
        super().__init__()
        self.decode_threads = max(1, decode_threads)
        self._pool: ThreadPoolExecutor | None = None  # made in the worker process (a loop is pickled to it)

    def start_decoders(self) -> None:
        """The threads requests are decoded in (made in the worker process, before its first batch)."""
        if self._pool is None and self.decode_threads > 1:
            self._pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="captioner-decode")

    def run_batched_loop(self, lit_api, request_queue, transport, callback_runner, lit_spec=None) -> None:
        self.start_decoders()
        while True:
            try:
                batch, timed_out = self.get_batch_requests(lit_api, request_queue, transport)
            except _StopLoopError:
                return
            for queue_id, uid in timed_out:
                self._answer(transport, queue_id, uid, HTTPException(504, "Request timed out"))
            if batch:
                self.serve_batch(lit_api, batch, transport, callback_runner)

    def serve_batch(self, lit_api, batch: Sequence[tuple[int, str, Any]], transport, callback_runner) -> None:
        """Decode each request, caption those that decoded together, and answer each request on its own."""
        callback_runner.trigger_event(EventTypes.BEFORE_DECODE_REQUEST.value, lit_api=lit_api)
        decoded = decode_each(lit_api.decode_request, [payload for _, _, payload in batch], self._pool)
        callback_runner.trigger_event(EventTypes.AFTER_DECODE_REQUEST.value, lit_api=lit_api)
        ready = []
        for (queue_id, uid, _), value in zip(batch, decoded):
            if isinstance(value, Exception):
                self._answer(transport, queue_id, uid, value)
            else:
                ready.append((queue_id, uid, value))
        if not ready:
            return
        callback_runner.trigger_event(EventTypes.BEFORE_PREDICT.value, lit_api=lit_api)
        try:
            outputs = lit_api.unbatch(lit_api.predict(lit_api.batch([value for _, _, value in ready])))
            if len(outputs) != len(ready):
                raise RuntimeError(f"predict returned {len(outputs)} rows for {len(ready)} requests")
        except Exception as error:  # a fault of the batch as a whole: every request in it is told
            outputs = [error] * len(ready)
        callback_runner.trigger_event(EventTypes.AFTER_PREDICT.value, lit_api=lit_api)
        callback_runner.trigger_event(EventTypes.BEFORE_ENCODE_RESPONSE.value, lit_api=lit_api)
        for (queue_id, uid, _), output in zip(ready, outputs):
            if isinstance(output, Exception):
                self._answer(transport, queue_id, uid, output)
                continue
            try:
                encoded = lit_api.encode_response(output)
            except Exception as error:
                self._answer(transport, queue_id, uid, error)
                continue
            self.put_response(transport, queue_id, uid, encoded, LitAPIStatus.OK, LoopResponseType.REGULAR)
        callback_runner.trigger_event(EventTypes.AFTER_ENCODE_RESPONSE.value, lit_api=lit_api)

    def _answer(self, transport, queue_id: int, uid: str, error: Exception) -> None:
        """One request's error: its own status and reason for an `HTTPException`, a logged 500 for anything else."""
        if isinstance(error, HTTPException):
            self.put_response(transport, queue_id, uid, PickleableHTTPException.from_exception(error),
                              LitAPIStatus.ERROR, LoopResponseType.REGULAR)  # fmt: skip
            return
        log.error("Captioning request %s failed: %s: %s", uid, type(error).__name__, error, exc_info=error)
        self.put_error_response(transport, queue_id, uid, error, LoopResponseType.REGULAR)
