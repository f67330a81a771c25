"""Serve a trained captioner over HTTP: an API with dynamic batching (LitServe) and a web page.

    python -m captioner serve --ckpt_path best.ckpt --port 8000

`POST /predict` captions one image (see `captioner.serve.api`), `POST /v1/chat/completions` does the same for
the tools that speak the OpenAI chat API (and `GET /v1/models` names the model; see `captioner.serve.openai`),
`GET /health`
answers once the model is loaded, `GET /info` says what the server accepts
(formats, limits, whether it needs an API key), `GET /` is a page to try
pictures on. What a hostile client can do is bounded: see
`captioner.serve.guard` (key, body deadline, bodies in flight, size, content
type) and `captioner.serve.api` (formats, pixels, decodes in flight).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from captioner.compat.names import upgraded
from captioner.core.parts import add_allow_argument, allow_modules
from captioner.core.pixels import ACCEPTED_FORMATS
from captioner.decoding import config as decoding_config

log = logging.getLogger("captioner")
STATIC = Path(__file__).parent / "static"
API_KEY_VARIABLE = "CAPTIONER_API_KEY"
BYTES_PER_DECODED_PIXEL = 12  # RGBA while decoding, the RGB copy, the tensor copy: what one decode holds at its peak


def decodes_within(memory_mb: float, max_pixels: int) -> int:
    """How many full-size decodes fit a memory budget (at least one)."""
    return max(1, int(memory_mb * 2**20 // (max_pixels * BYTES_PER_DECODED_PIXEL)))


def build_server(
    model_path: str | Path,
    accelerator: str = "auto",
    devices: int | str = "auto",
    workers: int = 1,
    decoding: dict | None = None,
    max_batch_size: int = 16,
    batch_timeout: float = 0.01,
    max_upload_mb: float = 20.0,
    max_pixels: int = 40_000_000,
    timeout: float = 60.0,
    body_timeout: float = 30.0,
    max_bodies: int = 64,
    api_key: str | None = None,
    decode_memory_mb: float = 1024.0,
    rerank_clip: str | None = None,
    model_name: str | None = None,
    allow_url_fetch: bool = False,
):
    """The LitServer for a model, with the request guard, the page and its files.

    Args:
        model_path: A checkpoint or an exported folder.
        accelerator: "cpu", "cuda" or "auto".
        devices: GPUs to use ("auto": all).
        workers: Model copies per device, each batching on its own.
        decoding: Decoding settings replacing the model's own (`{"num_beams": 5, "num_return": 3}`); a request may
            change them for itself.
        max_batch_size: Most requests captioned together.
        batch_timeout: Seconds a batch waits to fill up.
        max_upload_mb: The largest request body accepted.
        max_pixels: The largest image (width x height) decoded.
        timeout: Seconds a request may wait for its caption.
        body_timeout: Seconds a client has to send its whole body (408 after).
        max_bodies: Bodies received at once per server process (503 with Retry-After beyond).
        api_key: Required in the X-API-Key header of POST /predict (None: open).
        decode_memory_mb: Memory for full-size decodes at once in a worker; sets how many run together.
        rerank_clip: A CLIP model reordering the beam's alternatives by CLIPScore (`captioner.evaluation.clip_rerank`;
            a checkpoint or published folder, not an exported one).
        model_name: The model's name in the OpenAI API (None: the checkpoint's or the folder's name).
        allow_url_fetch: Fetch an http(s) image URL of a chat request (within the upload limit and body timeout);
            off, only `data:` URLs are read (a server that fetches can be pointed at the operator's own network).
    """
    import litserve as ls
    from fastapi.exception_handlers import http_exception_handler
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException

    from captioner.serve import openai
    from captioner.serve.api import CaptionAPI
    from captioner.serve.guard import RequestGuard, is_openai_path

    api = CaptionAPI(
        model_path,
        decoding,
        max_pixels,
        max_batch_size,
        batch_timeout,
        decodes_within(decode_memory_mb, max_pixels),
        rerank_clip,
        model_name,
        allow_url_fetch,
        int(max_upload_mb * 2**20),
        body_timeout,
    )
    guard = {
        "max_bytes": int(max_upload_mb * 2**20),
        "body_timeout": body_timeout,
        "max_bodies": max_bodies,
        "api_key": api_key,
    }
    server = ls.LitServer(
        api,
        accelerator=accelerator,
        devices=devices,
        workers_per_device=workers,
        timeout=timeout,
        middlewares=[(RequestGuard, guard)],
    )
    info = {
        "api_key_required": api_key is not None,
        "formats": list(ACCEPTED_FORMATS),
        "max_upload_mb": max_upload_mb,
        "max_pixels": max_pixels,
        "body_timeout_s": body_timeout,
        "openai": {"chat": openai.CHAT_PATH, "model": api.model_name, "fetches_urls": allow_url_fetch},
    }

    # The page replaces LitServe's own "litserve running" answer at "/", and /info says what this server accepts.
    server.app.router.routes = [
        route for route in server.app.router.routes if getattr(route, "path", None) not in ("/", "/info")
    ]
    server.app.add_api_route("/", lambda: FileResponse(STATIC / "index.html"), methods=["GET"], include_in_schema=False)
    server.app.add_api_route("/info", lambda: info, methods=["GET"], include_in_schema=False)
    server.app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # The chat endpoint is /predict's own handler at a second path: one queue, one batcher, one decode.
    (predict,) = [route for route in server.app.router.routes if getattr(route, "path", None) == "/predict"]
    server.app.add_api_route(openai.CHAT_PATH, predict.endpoint, methods=["POST"], dependencies=predict.dependencies)
    server.app.add_api_route(openai.MODELS_PATH, lambda: openai.models_list(api.model_name), methods=["GET"])

    async def errors(request, error: HTTPException):
        if not is_openai_path(request.url.path):
            return await http_exception_handler(request, error)
        return JSONResponse(openai.error_body(error.status_code, str(error.detail)), error.status_code, error.headers)

    server.app.add_exception_handler(HTTPException, errors)
    return server


def decoding_overrides(options: argparse.Namespace) -> dict:
    """The decoding settings `serve` was given, with captioner 0.2's `--beams N` (N ranked alternatives, 0: the
    best only) read as `--num_return` (one deprecation line).

    Raises:
        CaptionerError: When `--beams` and `--num_return` are both given, differently.
    """
    overrides = decoding_config.overrides_from(options)
    if options.beams is not None:
        overrides = upgraded({**overrides, "beams": max(1, options.beams)}, "serve")
    return overrides


def serve_parser() -> argparse.ArgumentParser:
    """The options of `python -m captioner serve`."""
    parser = argparse.ArgumentParser(prog="python -m captioner serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint written by fit, or a folder written by export")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (a GPU when there is one)")
    parser.add_argument("--devices", default="auto", help="how many GPUs (auto: all)")
    parser.add_argument("--workers", type=int, default=1, help="model copies per device")
    parser.add_argument("--max_batch_size", type=int, default=16, help="most requests captioned together")
    parser.add_argument("--batch_timeout", type=float, default=0.01, help="seconds a batch waits to fill up")
    parser.add_argument("--max_upload_mb", type=float, default=20.0, help="largest request body accepted")
    parser.add_argument("--max_pixels", type=int, default=40_000_000, help="largest image (width x height) decoded")
    parser.add_argument(
        "--decode_memory_mb",
        type=float,
        default=1024.0,
        help="memory for full-size decodes at once per worker (each takes max_pixels x 12 bytes)",
    )
    parser.add_argument("--body_timeout", type=float, default=30.0, help="seconds a client has to send its body")
    parser.add_argument("--max_bodies", type=int, default=64, help="uploads received at once (503 beyond)")
    parser.add_argument("--max_connections", type=int, default=256, help="open connections (503 beyond)")
    parser.add_argument("--keep_alive", type=float, default=5.0, help="seconds an idle connection stays open")
    parser.add_argument(
        "--api_key",
        default=None,
        help=f"require this key in the X-API-Key header (default: ${API_KEY_VARIABLE}, else none); "
        "use one on any host other than 127.0.0.1",
    )
    parser.add_argument(
        "--model_name", default=None, help="the model's name in the OpenAI API (default: the checkpoint's file name)"
    )
    parser.add_argument(
        "--allow_url_fetch",
        action="store_true",
        help="fetch http(s) image URLs of chat requests (off: data: URLs only; a fetching server can reach your "
        "network)",
    )
    decoding_config.add_arguments(parser)
    add_allow_argument(parser)
    parser.add_argument("--beams", type=int, default=None, help="deprecated: --num_return (0: the best caption only)")
    return parser


def serve_command(argv: list[str]) -> int:
    """`python -m captioner serve --ckpt_path CKPT [options]`: run the server until stopped."""
    options = serve_parser().parse_args(argv)
    allow_modules(*options.allow_module)
    api_key = options.api_key or os.environ.get(API_KEY_VARIABLE) or None
    path = Path(options.ckpt_path)
    from captioner.inference.loading import check_model

    check_model(path)  # refused here, in one line, before the server says it serves anything
    devices = options.devices if options.devices == "auto" else int(options.devices)
    server = build_server(
        path,
        options.device,
        devices,
        options.workers,
        decoding_overrides(options),
        options.max_batch_size,
        options.batch_timeout,
        options.max_upload_mb,
        options.max_pixels,
        body_timeout=options.body_timeout,
        max_bodies=options.max_bodies,
        api_key=api_key,
        decode_memory_mb=options.decode_memory_mb,
        rerank_clip=options.rerank_clip,
        model_name=options.model_name,
        allow_url_fetch=options.allow_url_fetch,
    )
    if api_key is None and options.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "Serving on %s without an API key: anyone who can reach it can use it (--api_key, or $%s).",
            options.host,
            API_KEY_VARIABLE,
        )
    log.info(
        "Serving %s on http://%s:%d (page at /, API at POST /predict, OpenAI API at /v1%s)",
        path,
        options.host,
        options.port,
        ", X-API-Key required" if api_key else "",
    )
    server.run(
        host=options.host,
        port=options.port,
        generate_client_file=False,
        pretty_logs=False,
        limit_concurrency=options.max_connections,
        timeout_keep_alive=options.keep_alive,
    )
    return 0
