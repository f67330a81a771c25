"""Phases: the Python API, the HTTP server under concurrent clients, and the exported runtime (fp32 and int8)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from bench.common import ROOT
from bench.training import _model


def write_checkpoint(path: str) -> dict:
    """The benchmark's LSTM model as a checkpoint file (what `serve` and `export` take)."""
    import torch

    from captioner.models.checkpoints import meta_of

    model = _model("lstm")
    torch.save({"state_dict": model.state_dict(), "captioner": meta_of(model)}, path)
    return {"written": path}


def export_models(checkpoint: str, folder: str, calibration_dir: str) -> dict:
    """Export the checkpoint four ways: fp32; int8 decoder; int8 decoder and dynamic int8 encoder; int8 decoder and
    static int8 encoder calibrated on `calibration_dir`."""
    from captioner.export.onnx import export_onnx
    from captioner.models.module import CaptionModel

    for name, quantize, encoder, calibration in (
        ("fp32", None, False, None),
        ("int8", "int8", False, None),
        ("int8-all", "int8", True, None),
        ("int8-static", "int8", True, calibration_dir),
    ):
        export_onnx(CaptionModel.from_checkpoint(checkpoint), Path(folder) / name, quantize, encoder, calibration, 32)
    return {"exported": folder}


def onnx_extract(folder: str, images_dir: str, names: list[str], batch_size: int) -> dict:
    """ONNX Runtime extraction, file to features: decode and resize (NumPy), then the encoder graph."""
    from captioner.inference import OnnxCaptioner

    runtime = OnnxCaptioner(folder)
    paths = [Path(images_dir) / name for name in names]
    runtime.features(np.stack([runtime._pixels(p) for p in paths[:2]]))  # warm-up
    started = time.perf_counter()
    for start in range(0, len(paths), batch_size):
        runtime.features(np.stack([runtime._pixels(p) for p in paths[start : start + batch_size]]))
    return {"images_per_s": len(paths) / (time.perf_counter() - started), "images": len(paths)}


def onnx_decode(folder: str, features_file: str, count: int, beam_size: int, batch_size: int) -> dict:
    """ONNX Runtime decoding of cached features, search in NumPy."""
    from captioner.inference import OnnxCaptioner

    runtime = OnnxCaptioner(folder, num_beams=beam_size)
    features = np.asarray(np.load(features_file, mmap_mode="r")[:count], dtype=np.float32)
    runtime.decode_features(features[:batch_size])  # warm-up
    started, lengths = time.perf_counter(), []
    for start in range(0, count, batch_size):
        lengths.append(runtime.decode_features(features[start : start + batch_size]).best_lengths)
    return {
        "captions_per_s": count / (time.perf_counter() - started),
        "mean_length": float(np.concatenate(lengths).mean()),
    }


def api_throughput(checkpoint: str, images_dir: str, names: list[str], batch_size: int) -> dict:
    """The Captioner API's own batch throughput and its time for one image, on the files the server gets."""
    from captioner import Captioner

    captioner = Captioner.from_checkpoint(checkpoint, device="cpu", batch_size=batch_size)
    paths = [Path(images_dir) / name for name in names]
    captioner.predict(paths[:2])  # warm-up
    started = time.perf_counter()
    captioner.predict(paths)
    batch_rate = len(paths) / (time.perf_counter() - started)
    singles = []
    for path in paths[:20]:
        started = time.perf_counter()
        captioner.predict([path])
        singles.append(time.perf_counter() - started)
    return {"images_per_s": batch_rate, "single_ms": 1000 * float(np.median(singles))}


def server_throughput(checkpoint: str, images_dir: str, names: list[str], clients: int, batch_size: int) -> dict:
    """`python -m captioner serve` on 127.0.0.1: images/s with `clients` concurrent clients, and one-request latency."""
    import signal
    import socket
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "captioner",
        "serve",
        "--ckpt_path",
        checkpoint,
        "--port",
        str(port),
        "--device",
        "cpu",
        "--max_batch_size",
        str(batch_size),
        "--batch_timeout",
        "0.005",
        "--num_return",
        "1",
    ]
    server = subprocess.Popen(
        command,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=1).text == "ok":
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        bodies = [(Path(images_dir) / name).read_bytes() for name in names]
        with httpx.Client(timeout=300) as client:

            def ask(data: bytes) -> tuple[float, float]:
                """The request's latency, and the server's own time for it: decoding the image and the model."""
                started = time.perf_counter()
                response = client.post(f"{url}/predict", files={"image": ("image.jpg", data)}, data={"num_return": "1"})
                response.raise_for_status()
                times = response.json()["time_ms"]
                return time.perf_counter() - started, (times["decode"] + times["model"]) / 1000

            for data in bodies[:3]:
                ask(data)  # warm-up
            singles = [ask(data) for data in bodies[:20]]
            with ThreadPoolExecutor(clients) as pool:
                started = time.perf_counter()
                list(pool.map(ask, bodies))
                rate = len(bodies) / (time.perf_counter() - started)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    # The overhead is measured on the same requests as the model time it is set against: this machine's
    # speed drifts between phases more than the overhead is worth.
    latencies, model_times = np.array(singles).T
    return {
        "images_per_s": rate,
        "single_ms": 1000 * float(np.median(latencies)),
        "clients": clients,
        "model_ms": 1000 * float(np.median(model_times)),
        "overhead_ms": 1000 * float(np.median(latencies - model_times)),
    }
