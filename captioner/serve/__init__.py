"""Serve a trained captioner over HTTP: an API with dynamic batching (LitServe) and a web page.

    python -m captioner serve --ckpt_path best.ckpt --port 8000

`POST /predict` captions one image (see `captioner.serve.api`), `GET /health`
answers once the model is loaded, `GET /` is a page to try pictures on.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from captioner.errors import CaptionerError

log = logging.getLogger("captioner")
STATIC = Path(__file__).parent / "static"


def load_model(path: str | Path, device: str | None = None, beam_size: int | None = None):
    """A captioner for a checkpoint file (torch) or an exported folder (ONNX Runtime), with `describe`.

    Raises:
        CaptionerError: When the path is neither.
    """
    path = Path(path)
    if path.is_dir():
        from captioner.runtime import OnnxCaptioner

        return OnnxCaptioner(path, beam_size=beam_size)
    if not path.is_file():
        raise CaptionerError(f"{path} is neither a checkpoint file nor an exported folder.")
    from captioner.inference import Captioner

    return Captioner.from_checkpoint(path, None if device in (None, "auto") else device, beam_size=beam_size)


def build_server(model_path: str | Path, accelerator: str = "auto", devices: int | str = "auto", workers: int = 1,
                 beam_size: int | None = None, beams: int = 3, max_batch_size: int = 16, batch_timeout: float = 0.01,
                 max_upload_mb: float = 20.0, max_pixels: int = 40_000_000, timeout: float = 60.0):  # fmt: skip
    """The LitServer for a model, with the request guard, the page and its files.

    Args:
        model_path: A checkpoint or an exported folder.
        accelerator: "cpu", "cuda" or "auto".
        devices: GPUs to use ("auto": all).
        workers: Model copies per device, each batching on its own.
        beam_size: Beams searched per image (None: the model's setting).
        beams: Alternatives returned when a request does not ask for a number.
        max_batch_size: Most requests captioned together.
        batch_timeout: Seconds a batch waits to fill up.
        max_upload_mb: The largest request body accepted.
        max_pixels: The largest image (width x height) decoded.
        timeout: Seconds a request may wait for its caption.
    """
    import litserve as ls
    from fastapi.responses import FileResponse
    from fastapi.staticfiles import StaticFiles

    from captioner.serve.api import CaptionAPI
    from captioner.serve.guard import RequestGuard

    api = CaptionAPI(model_path, beam_size, beams, max_pixels, max_batch_size, batch_timeout)
    server = ls.LitServer(api, accelerator=accelerator, devices=devices, workers_per_device=workers, timeout=timeout,
                          middlewares=[(RequestGuard, {"max_bytes": int(max_upload_mb * 2**20)})])  # fmt: skip
    # The page replaces LitServe's own "litserve running" answer at "/".
    server.app.router.routes = [route for route in server.app.router.routes if getattr(route, "path", None) != "/"]
    server.app.add_api_route("/", lambda: FileResponse(STATIC / "index.html"), methods=["GET"], include_in_schema=False)
    server.app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return server


def serve_command(argv: list[str]) -> int:
    """`python -m captioner serve --ckpt_path CKPT [options]`: run the server until stopped."""
    parser = argparse.ArgumentParser(prog="python -m captioner serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint written by fit, or a folder written by export")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (a GPU when there is one)")
    parser.add_argument("--devices", default="auto", help="how many GPUs (auto: all)")
    parser.add_argument("--workers", type=int, default=1, help="model copies per device")
    parser.add_argument("--beam_size", type=int, default=None, help="beams searched per image (default: the model's)")
    parser.add_argument("--beams", type=int, default=3, help="alternatives returned unless a request says otherwise")
    parser.add_argument("--max_batch_size", type=int, default=16, help="most requests captioned together")
    parser.add_argument("--batch_timeout", type=float, default=0.01, help="seconds a batch waits to fill up")
    parser.add_argument("--max_upload_mb", type=float, default=20.0, help="largest request body accepted")
    parser.add_argument("--max_pixels", type=int, default=40_000_000, help="largest image (width x height) decoded")
    options = parser.parse_args(argv)
    path = Path(options.ckpt_path)
    if not path.exists():
        raise CaptionerError(f"--ckpt_path {path} does not exist.")
    devices = options.devices if options.devices == "auto" else int(options.devices)
    server = build_server(path, options.device, devices, options.workers, options.beam_size, options.beams,
                          options.max_batch_size, options.batch_timeout, options.max_upload_mb,
                          options.max_pixels)  # fmt: skip
    log.info("Serving %s on http://%s:%d (page at /, API at POST /predict)", path, options.host, options.port)
    server.run(host=options.host, port=options.port, generate_client_file=False, pretty_logs=False)
    return 0
