"""RequestGuard: the ASGI middleware that refuses what the model should never see, before anything reads it.

In order, for every POST:

- a missing or wrong API key (when one is set) gets 401, before a byte of the body is read;
- more bodies being received at once than `max_bodies` gets 503 with `Retry-After`;
- a body over the size limit gets 413, whether it declares its length or streams it;
- a body not received in full within `body_timeout` seconds (a slow or stalled client) gets 408;
- a request to the caption endpoint that is neither multipart nor JSON gets 415;
- malformed JSON gets 400 (the body is buffered, checked, and replayed to the app).

Every refusal closes the connection (`Connection: close`), so a client that was
cut off mid-body cannot keep the socket and its buffer. Uploads stay in memory:
the limit caps them, and multipart files are kept in memory up to that size
instead of being spooled to a temporary file, so nothing a client sends is ever
written to disk.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.formparsers import MultiPartParser

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
API_KEY_HEADER = "x-api-key"


async def send_json(send: Send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    """A JSON error response `{"detail": ...}`, as FastAPI writes them, closing the connection."""
    body = json.dumps({"detail": detail}).encode()
    fields = {
        "content-type": "application/json",
        "content-length": str(len(body)),
        "connection": "close",
        **(headers or {}),
    }
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(key.encode(), value.encode()) for key, value in fields.items()],
        }
    )
    await send({"type": "http.response.body", "body": body})


class _BodyTooLargeError(Exception):
    pass


class RequestGuard:
    """See the module docstring.

    Args:
        app: The ASGI app it guards.
        max_bytes: The largest request body accepted.
        api_path: The caption endpoint, whose content types (and key) are checked.
        body_timeout: Seconds a client has to send its whole body.
        max_bodies: Bodies received at once, beyond which requests are turned away (503).
        api_key: Required in the `X-API-Key` header of the caption endpoint (None: no key).
    """

    def __init__(
        self,
        app,
        max_bytes: int = 20 * 2**20,
        api_path: str = "/predict",
        body_timeout: float = 30.0,
        max_bodies: int = 64,
        api_key: str | None = None,
    ) -> None:
        self.app, self.max_bytes, self.api_path = app, max_bytes, api_path
        self.body_timeout, self.max_bodies, self.api_key = body_timeout, max_bodies, api_key or None
        self.receiving = 0  # one event loop per server process: a plain counter is enough
        # Starlette spools multipart files over 1 MB to a temporary file; keep every accepted upload in memory.
        MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, max_bytes + 1)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        if scope["path"] == self.api_path and self.api_key is not None:
            given = headers.get(API_KEY_HEADER, "")
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                return await send_json(
                    send,
                    401,
                    "This server needs an API key: send it in the X-API-Key header.",
                    {"www-authenticate": "X-API-Key"},
                )
        limit = f"over the {self.max_bytes / 2**20:g} MB limit (--max_upload_mb)"
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await send_json(send, 413, f"The request is {int(declared) / 2**20:.1f} MB, {limit}.")
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if scope["path"] == self.api_path and content_type not in ("multipart/form-data", "application/json"):
            return await send_json(
                send, 415, 'Send the image as multipart/form-data (field \'image\') or as JSON {"image": "<base64>"}.'
            )
        if self.receiving >= self.max_bodies:
            return await send_json(
                send,
                503,
                f"The server is receiving {self.receiving} uploads already (--max_bodies); try again shortly.",
                {"retry-after": "1"},
            )
        self.receiving += 1
        try:
            body = await asyncio.wait_for(self._read_body(receive), self.body_timeout)
        except asyncio.TimeoutError:
            return await send_json(
                send,
                408,
                f"The body was not received within {self.body_timeout:g} s "
                "(--body_timeout): send it faster, or a smaller image.",
            )
        except _BodyTooLargeError:
            return await send_json(send, 413, f"The request is over {self.max_bytes / 2**20:g} MB, {limit}.")
        finally:
            self.receiving -= 1
        if body is None:  # the client went away
            return None
        if scope["path"] == self.api_path and content_type == "application/json":
            try:
                payload = json.loads(body)
            except (ValueError, UnicodeDecodeError) as error:
                return await send_json(send, 400, f"The body is not valid JSON ({error}).")
            if not isinstance(payload, dict):
                return await send_json(send, 400, 'The JSON body must be an object: {"image": "<base64>"}.')
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole (limited) body: its length may not be declared, or may be a lie."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise _BodyTooLargeError
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)
