"""The OpenAI chat API, spoken by `serve` beside `/predict`, so the tools that caption datasets through any
OpenAI-compatible server (taggers, galleries, CaptionFlow's workers) can use a captioner model:

    POST /v1/chat/completions   {"model": ..., "messages": [{"role": "user", "content": [
                                    {"type": "text", "text": "Describe this image."},
                                    {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,..."}}]}],
                                 "max_tokens": 30, "temperature": 0, "top_p": 1, "seed": 7, "n": 3, ...}
    GET  /v1/models             the model this server serves

A request goes through the same path as `/predict` (the same decoding, the same checks and limits, the same
per-request isolation, the same engine); only its shape differs:

- the image is the last `image_url` part of the messages: a `data:` URL (base64, decoded under the upload guard),
  or an http(s) URL, refused unless the operator allows fetching (`--allow_url_fetch`), then fetched with the
  upload's size limit and the body timeout;
- `max_tokens` (or `max_completion_tokens`) caps the caption's length, as OpenAI's models read it: under the
  model's own longest caption it is `max_length`, above it changes nothing (tools send 300 or 1024 by habit);
- a `temperature` or `top_p` asks for sampling (a temperature of 0, or none, for the model's own search); `seed`
  seeds it; `n` is how many ranked captions come back (`num_return`, from the beam); every other `DecodingConfig`
  field may be given too (the `openai` client's `extra_body`); a `style` field, or a style the message's text names
  ("tags", "short"), picks a caption style of a model trained with several;
- the answer is a `chat.completion` whose choices are the captions, best first, `usage` counting the captions'
  tokens (the image is no prompt tokens); errors have OpenAI's shape, `{"error": {"message", "type", "code"}}`,
  with the status `/predict` gives the same fault.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
import uuid
from typing import Any

from fastapi import HTTPException

CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"
NO_IMAGE = (
    'No image: add a content part {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,..."}} to a '
    "message."
)
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    408: "timeout",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "server_error",
}
# OpenAI's fields, and the decoding setting each one is (those not listed are the client's business).
CHAT_FIELDS = frozenset(
    ("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "n", "stream", "user")
    + ("logprobs", "top_logprobs", "frequency_penalty", "presence_penalty", "stop", "response_format", "metadata")
)


def error_body(status: int, message: str) -> dict[str, Any]:
    """An error in OpenAI's shape."""
    kind = ERROR_TYPES.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": str(status)}}


def is_chat(request: Any) -> bool:
    """Whether a request body is an OpenAI chat request (it has `messages`)."""
    return isinstance(request, dict) and "messages" in request


def _parts(messages: Any) -> tuple[list[str], list[str]]:
    """The texts and image URLs of the messages, in order."""
    if not isinstance(messages, list) or not messages:
        raise HTTPException(400, "'messages' must be a list of messages, one of them holding an image_url part.")
    texts, images = [], []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            texts.append(content)
            continue
        for part in content if isinstance(content, list) else []:
            if not isinstance(part, dict):
                continue
            if part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif part.get("type") == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if isinstance(url, str):
                    images.append(url)
    return texts, images


def chat_fields(request: dict[str, Any], longest: int, styles: tuple[str, ...] = ()) -> tuple[str, dict[str, Any]]:
    """A chat request as the image's URL and the `/predict` fields it asks for.

    Args:
        request: The chat request's JSON body.
        longest: The most words the server's settings let a caption have (`max_tokens` at or over it is no cap).
        styles: The caption styles the model knows (a style named in the text picks it).

    Raises:
        HTTPException: 400 when there is no image, or for what a captioner cannot do (streaming, several sampled
            captions).
    """
    texts, images = _parts(request.get("messages"))
    if not images:
        raise HTTPException(400, NO_IMAGE)
    if request.get("stream"):
        raise HTTPException(400, "'stream' is not supported: a caption comes back whole (stream: false).")
    fields = {key: value for key, value in request.items() if key not in CHAT_FIELDS}  # extra_body: our settings
    limit = request.get("max_completion_tokens", request.get("max_tokens"))
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise HTTPException(400, f"'max_tokens' must be a whole number of at least 1, got {limit!r}.")
    if limit is not None and limit < longest:
        fields.setdefault("max_length", limit)
    sampled = request.get("temperature") not in (None, 0) or request.get("top_p") not in (None, 1)
    if sampled:
        fields.setdefault("do_sample", True)
        for key in ("temperature", "top_p"):
            if request.get(key) is not None:
                fields.setdefault(key, request[key])
    if request.get("seed") is not None:
        fields.setdefault("seed", request["seed"])
    count = request.get("n")
    if count not in (None, 1):
        if sampled:
            raise HTTPException(
                400,
                "'n' > 1 with sampling: a sampled caption is one per image; ask for n captions with temperature 0 "
                "(the beam's ranked captions).",
            )
        fields.setdefault("num_return", count)
    if "style" not in fields and styles:
        named = [style for style in styles if re.search(rf"\b{re.escape(style)}\b", " ".join(texts), re.IGNORECASE)]
        if named:
            fields["style"] = named[0]
    return images[-1], fields


def data_url_bytes(url: str) -> bytes | None:
    """A `data:` URL's bytes (None for another URL).

    Raises:
        HTTPException: 400 when it is not base64.
    """
    if not url.startswith("data:"):
        return None
    header, _, text = url.partition(",")
    if ";base64" not in header:
        raise HTTPException(400, "The image's data: URL must be base64 (data:image/jpeg;base64,...).")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(400, "The image's data: URL is not valid base64.") from None


async def fetched(url: str, max_bytes: int, timeout: float) -> bytes:
    """An http(s) image, read up to `max_bytes` within `timeout` seconds (only when the operator allows fetching).

    Raises:
        HTTPException: 400 for another scheme or a failed fetch, 413 over the size, 408 past the time.
    """
    import httpx

    if not url.startswith(("http://", "https://")):
        raise HTTPException(400, "The image URL must be data: (base64), or http(s) where this server fetches.")
    try:
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=True, max_redirects=3) as client:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise HTTPException(400, f"Fetching the image failed: {url} answered {response.status_code}.")
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > max_bytes:
                        limit = f"{max_bytes / 2**20:g} MB (--max_upload_mb)"
                        raise HTTPException(413, f"The image at {url} is over {limit}.")
                return bytes(data)
    except httpx.TimeoutException:
        raise HTTPException(408, f"Fetching {url} took over {timeout:g} s (--body_timeout).") from None
    except httpx.HTTPError as error:
        raise HTTPException(400, f"Fetching the image failed: {type(error).__name__}: {error}.") from None


def completion(prediction: Any, model: str, count_tokens: Any) -> dict[str, Any]:
    """A caption as a `chat.completion`: one choice per caption (the ranked alternatives with `n`), best first."""
    alternatives = prediction.alternatives
    captions = [entry["caption"] for entry in alternatives] if alternatives else [prediction.caption]
    tokens = sum(count_tokens(caption) for caption in captions)
    choices = [
        {
            "index": index,
            "message": {"role": "assistant", "content": caption},
            "finish_reason": "stop",
            "logprobs": None,
        }
        for index, caption in enumerate(captions)
    ]
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": {"prompt_tokens": 0, "completion_tokens": tokens, "total_tokens": tokens},
    }


def models_list(model: str) -> dict[str, Any]:
    """`GET /v1/models`: the one model this server serves."""
    return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "captioner"}]}
