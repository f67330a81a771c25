"""RequestGuard: the ASGI middleware that refuses what the model should never see, before anything reads it.

In order, for every POST:

- a missing or wrong API key (when one is set) gets 401, before a byte of the body is read (the key in `X-API-Key`,
  or as OpenAI's clients send it, `Authorization: Bearer <key>`);
- more bodies being received at once than `max_bodies` gets 503 with `Retry-After`;
- a body over the size limit gets 413, whether it declares its length or streams it;
- a body not received in full within `body_timeout` seconds (a slow or stalled client) gets 408;
- a request to `/predict` that is neither multipart nor JSON, or to the chat endpoint that is not JSON, gets 415;
- malformed JSON gets 400 (the body is buffered, checked, and replayed to the app).

Refusals of the OpenAI API's paths (`/v1/...`) have OpenAI's error shape (`captioner.serve.openai.error_body`).

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

from captioner.serve.openai import CHAT_PATH, error_body

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
API_KEY_HEADER = "x-api-key"


def is_openai_path(path: str) -> bool:
    """Whether a path is the OpenAI API's (its errors have OpenAI's shape)."""
    return path.startswith("/v1/")


async def send_json(
    send: Send, status: int, detail: str, headers: dict[str, str] | None = None, path: str = ""
) -> None:
    """A JSON error response, closing the connection: `{"detail": ...}` as FastAPI writes them, or OpenAI's shape on
    its paths."""
    body = json.dumps(error_body(status, detail) if is_openai_path(path) else {"detail": detail}).encode()
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
        api_path: The caption endpoint, whose content types (and key) are checked, as the chat endpoint's.
        body_timeout: Seconds a client has to send its whole body.
        max_bodies: Bodies received at once, beyond which requests are turned away (503).
        api_key: Required in the `X-API-Key` (or `Authorization: Bearer`) header of the caption endpoints (None: no
            key).
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
        path = scope["path"]
        captions = path in (self.api_path, CHAT_PATH)

        async def refuse(status: int, detail: str, extra: dict[str, str] | None = None) -> None:
            await send_json(send, status, detail, extra, path)

        if captions and self.api_key is not None and not self._key_matches(headers):
            return await refuse(
                401,
                "This server needs an API key: send it in the X-API-Key header (or as Authorization: Bearer <key>).",
                {"www-authenticate": "X-API-Key, Bearer"},
            )
        limit = f"over the {self.max_bytes / 2**20:g} MB limit (--max_upload_mb)"
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await refuse(413, f"The request is {int(declared) / 2**20:.1f} MB, {limit}.")
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if path == self.api_path and content_type not in ("multipart/form-data", "application/json"):
            return await refuse(
                415, 'Send the image as multipart/form-data (field \'image\') or as JSON {"image": "<base64>"}.'
            )
        if path == CHAT_PATH and content_type != "application/json":
            return await refuse(415, "Send the chat request as JSON (Content-Type: application/json).")
        if self.receiving >= self.max_bodies:
            return await refuse(
                503,
                f"The server is receiving {self.receiving} uploads already (--max_bodies); try again shortly.",
                {"retry-after": "1"},
            )
        self.receiving += 1
        try:
            body = await asyncio.wait_for(self._read_body(receive), self.body_timeout)
        except asyncio.TimeoutError:
            return await refuse(
                408,
                f"The body was not received within {self.body_timeout:g} s "
                "(--body_timeout): send it faster, or a smaller image.",
            )
        except _BodyTooLargeError:
            return await refuse(413, f"The request is over {self.max_bytes / 2**20:g} MB, {limit}.")
        finally:
            self.receiving -= 1
        if body is None:  # the client went away
            return None
        if captions and content_type == "application/json":
            try:
                payload = json.loads(body)
            except (ValueError, UnicodeDecodeError) as error:
                return await refuse(400, f"The body is not valid JSON ({error}).")
            if not isinstance(payload, dict):
                shape = '{"model": ..., "messages": [...]}' if path == CHAT_PATH else '{"image": "<base64>"}'
                return await refuse(400, f"The JSON body must be an object: {shape}.")
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    def _key_matches(self, headers: dict[str, str]) -> bool:
        """Whether the request carries the key, in `X-API-Key` or as `Authorization: Bearer <key>`."""
        bearer = headers.get("authorization", "")
        given = bearer[7:].strip() if bearer[:7].lower() == "bearer " else headers.get(API_KEY_HEADER, "")
        return hmac.compare_digest(given.encode(), self.api_key.encode())

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
