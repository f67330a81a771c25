"""Int8 quantisation of exported graphs with ONNX Runtime's tools.

- The decoder's `prepare` and `step` graphs: dynamic quantisation (int8 weights, activations quantised per call):
  their work is matrix products, which it speeds up, with no data needed.
- The encoder: static quantisation in the QDQ format, calibrated on sample images the user gives
  (`--calibration_dir`): the ranges of every activation are measured once, so convolutions run as int8
  convolutions. (Dynamic quantisation turns each convolution into ConvInteger with its input quantised at every
  call, which made the exported ResNet 0.34x as fast as PyTorch's.) Without sample images the encoder falls back
  to dynamic quantisation, and says so.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from captioner.core.errors import CaptionerError
from captioner.encoders.preprocessing import DECODE_ERRORS, Preprocessing
from captioner.sources.images import find_images

log = logging.getLogger("captioner")
CALIBRATION_BATCH = 8


def quantize_dynamic_graph(path: Path) -> None:
    """Replace an ONNX graph by its dynamically quantised int8 version (weights int8, activations per call)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantized = path.with_suffix(".int8.onnx")
    quantize_dynamic(path, quantized, weight_type=QuantType.QInt8)
    quantized.replace(path)


def calibration_batches(folder: str | Path, preprocessing: Preprocessing, limit: int) -> list[np.ndarray]:
    """Up to `limit` images of a folder (searched recursively) as the encoder's uint8 input, in small batches.

    Raises:
        CaptionerError: When the folder holds no image that can be read.
    """
    scan = find_images(Path(folder))
    pixels = []
    for path in scan.images:
        if len(pixels) == limit:
            break
        try:
            pixels.append(preprocessing.from_file(path).numpy())
        except DECODE_ERRORS:
            continue  # an unreadable sample is simply not used
    if not pixels:
        raise CaptionerError(
            f"--calibration_dir {folder} holds no image that can be read: give a folder of pictures "
            "like those the model will caption."
        )
    return [np.stack(pixels[i : i + CALIBRATION_BATCH]) for i in range(0, len(pixels), CALIBRATION_BATCH)]


def quantize_static_encoder(path: Path, batches: list[np.ndarray]) -> dict:
    """Replace the encoder graph by its statically quantised QDQ version, calibrated on `batches` (min-max ranges,
    int8 weights per channel, uint8 activations). Returns what the manifest records of it."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Samples(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches: Iterator[np.ndarray] = iter(batches)

        def get_next(self) -> dict | None:
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch}

    with tempfile.TemporaryDirectory(dir=path.parent) as work:
        prepared = Path(work) / "prepared.onnx"
        quant_pre_process(str(path), str(prepared), skip_symbolic_shape=True)  # fold and infer shapes first
        quantized = path.with_suffix(".int8.onnx")
        quantize_static(
            prepared,
            quantized,
            Samples(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
        quantized.replace(path)
    return {"method": "static (QDQ)", "calibration_images": int(sum(len(batch) for batch in batches))}
