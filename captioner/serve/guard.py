"""RequestGuard: the ASGI middleware that refuses what the model should never see, before anything reads it.

- A body over the size limit gets 413, whether it declares its length or streams it.
- A request to the caption endpoint that is neither multipart nor JSON gets 415.
- Malformed JSON gets 400 (the body is buffered, checked, and replayed to the app).

Uploads stay in memory: the limit caps them, and multipart files are kept in
memory up to that size instead of being spooled to a temporary file, so nothing
a client sends is ever written to disk.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.formparsers import MultiPartParser

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


async def send_json(send: Send, status: int, detail: str) -> None:
    """A JSON error response `{"detail": ...}`, as FastAPI writes them."""
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """See the module docstring.

    Args:
        app: The ASGI app it guards.
        max_bytes: The largest request body accepted.
        api_path: The caption endpoint, whose content types are checked.
    """

    def __init__(self, app, max_bytes: int = 20 * 2**20, api_path: str = "/predict") -> None:
        self.app, self.max_bytes, self.api_path = app, max_bytes, api_path
        # Starlette spools multipart files over 1 MB to a temporary file; keep every accepted upload in memory.
        MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, max_bytes + 1)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        limit = f"over the {self.max_bytes / 2**20:g} MB limit (--max_upload_mb)"
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await send_json(send, 413, f"The request is {int(declared) / 2**20:.1f} MB, {limit}.")
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if scope["path"] == self.api_path and content_type not in ("multipart/form-data", "application/json"):
            return await send_json(send, 415, "Send the image as multipart/form-data (field 'image') or as JSON "
                                              '{"image": "<base64>"}.')  # fmt: skip
        chunks, size = [], 0
        while True:  # read the whole (limited) body now: its length may not be declared
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await send_json(send, 413, f"The request is over {self.max_bytes / 2**20:g} MB, {limit}.")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
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
