"""The exported runtime: a captioner for exported folders that needs only ONNX Runtime, NumPy and Pillow, no torch
and no Lightning.

    from captioner.inference import OnnxCaptioner
    captioner = OnnxCaptioner("captioner-onnx/")
    captioner.caption(["a.jpg", "b.png"])           # -> list[str]
    captioner.predict(paths)                         # -> [Prediction(image, caption, score, ...)]

The folder (written by `python -m captioner export`) holds the encoder, the
decoder's `prepare` and `step` graphs, the vocabulary, the preprocessing and
the decoding settings, each file checked against the manifest's digest when it
is loaded. Search runs here in NumPy through the same code as the PyTorch
captioner's (`captioner.decoding.search`, with `captioner.decoding.ops.NumpyOps`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from captioner.core.pixels import open_image, preprocess_array, to_rgb
from captioner.decoding.answers import describe
from captioner.decoding.confidence import Calibrator
from captioner.decoding.config import DecodingConfig, ModelLimits, SpecialTokens
from captioner.decoding.ops import NumpyOps
from captioner.decoding.search import Decoded, decode
from captioner.inference.engine import DEFAULT_DECODE_THREADS
from captioner.inference.manifest import MANIFEST, ExportManifest
from captioner.inference.protocol import ImageCaptioner
from captioner.text.base import tokenizer_from_dict


class OnnxStepper:
    """An exported decoder's `prepare` and `step` graphs as the step function search runs (see
    `captioner.decoding.search`): the same algorithm and rules as the PyTorch captioner, on NumPy arrays."""

    def __init__(self, captioner: OnnxCaptioner, features: np.ndarray) -> None:
        self.captioner, self.features = captioner, features
        self.context: list[np.ndarray] = []

    def start(self, copies: int) -> list[np.ndarray]:
        runtime = self.captioner
        outputs = runtime.prepare.run(None, {"features": self.features})
        context, state = outputs[: runtime.context_count], outputs[runtime.context_count :]
        if copies > 1:
            state = [np.repeat(part, copies, axis=0) for part in state]
            if not runtime.context_per_image:
                context = [np.repeat(part, copies, axis=0) for part in context]
        self.context = context
        return state

    def step(self, tokens: np.ndarray, state: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        runtime = self.captioner
        feeds = {"tokens": tokens.astype(np.int64)}
        feeds.update({f"state{i}": part for i, part in enumerate(state)})
        feeds.update({f"context{i}": part for i, part in enumerate(self.context)})
        outputs = runtime.step.run(None, {name: value for name, value in feeds.items() if name in runtime.step_inputs})
        return outputs[0], outputs[1:]  # logits (version 3), or log-probabilities of older exports: rules apply alike

    def reorder(self, state: list[np.ndarray], rows: np.ndarray) -> list[np.ndarray]:
        return [part[rows] for part in state]


class NumpyPixels:
    """How an export's images become its encoder's input, in NumPy (`captioner.inference.engine.PixelDecoder`): the
    encoder's preprocessing definition computed without torch, large JPEGs decoded reduced as on the torch path."""

    def __init__(self, definition: dict) -> None:
        self.definition = definition

    def host(self, data: Any, max_pixels: int | None = None) -> np.ndarray:
        """Bytes, a PIL image or an `(H, W, 3)` uint8 array as the `(3, S, S)` uint8 input.

        Raises:
            One of `captioner.core.pixels.DECODE_ERRORS`; TypeError for anything that is not an image.
        """
        if isinstance(data, (bytes, bytearray)):
            image = np.asarray(open_image(bytes(data), max_pixels, self.definition))
        elif isinstance(data, Image.Image):
            image = np.asarray(to_rgb(data))
        elif isinstance(data, np.ndarray) and data.ndim == 3 and data.shape[-1] == 3 and data.dtype == np.uint8:
            image = data
        else:
            raise TypeError(
                f"not an image: {type(data).__name__} (give a path, bytes, a PIL image or an (H, W, 3) uint8 array)"
            )
        return preprocess_array(image, self.definition)

    def for_device(self, data: bytes, max_pixels: int | None = None) -> bool:
        return False

    def on_device(self, encoded: list[bytes]) -> list[Any]:
        raise NotImplementedError("the exported runtime decodes on the host")

    def stack(self, pixels: list[np.ndarray]) -> np.ndarray:
        return np.stack(pixels)


class ExportSide:
    """An export's graphs as `captioner.decoding.answers.ModelSide` (no attention maps: they need the checkpoint)."""

    def __init__(self, captioner: OnnxCaptioner) -> None:
        self.captioner = captioner
        self.vocabulary, self.calibrator, self.clip_calibrator = captioner.vocabulary, captioner.calibrator, None

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        return self.captioner.features(pixels)

    def search(self, features: np.ndarray, config: DecodingConfig, places: list[int] | None) -> Decoded:
        return self.captioner.decode_features(features, config, places)

    def stepper(self, features: np.ndarray) -> OnnxStepper:
        return OnnxStepper(self.captioner, features)

    def ops(self, features: np.ndarray) -> NumpyOps:
        return NumpyOps()

    def attention(self, features: np.ndarray, decoded: Decoded) -> None:
        return None


class OnnxCaptioner(ImageCaptioner):
    """Caption images with an exported folder, on the CPU (or another ONNX Runtime provider).

    Args:
        folder: Written by `python -m captioner export`.
        batch_size: Images per encoder and decoder run.
        providers: ONNX Runtime execution providers (None: the CPU).
        threads: Threads per session (None: ONNX Runtime's choice).
        decoding: How to decode (None: the export's settings).
        decode_threads: Images decoded at once.
        overrides: Decoding settings changed from those (`num_beams=5`, ...; the 0.2 name `beam_size` works too).
    """

    def __init__(
        self,
        folder: str | Path,
        batch_size: int = 32,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        decoding: DecodingConfig | None = None,
        decode_threads: int = DEFAULT_DECODE_THREADS,
        **overrides: Any,
    ) -> None:
        import onnxruntime

        self.folder = Path(folder)
        self.manifest = manifest = ExportManifest.read(self.folder)
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        providers = list(providers or ["CPUExecutionProvider"])

        def session(name: str):
            return onnxruntime.InferenceSession(str(self.folder / manifest.graphs[name]), options, providers=providers)

        self.encoder, self.prepare, self.step = session("encoder"), session("prepare"), session("step")
        self.step_inputs = {item.name for item in self.step.get_inputs()}
        # Only captioner's own tokenizers: the folder may come from anyone, and nothing it names is imported.
        self.vocabulary = tokenizer_from_dict(manifest.vocabulary, str(self.folder / MANIFEST), built_in_only=True)
        self.special = SpecialTokens.of(self.vocabulary)
        saved = DecodingConfig.from_dict(manifest.decoding, str(self.folder / MANIFEST))
        self.limits = ModelLimits(
            len(self.vocabulary),
            self.vocabulary.max_length,
            manifest.longest_caption,
            manifest.decoder["class_path"].rsplit(".", 1)[-1],
            self.vocabulary.stoi,
            self.vocabulary,
        )
        self.decoding = (decoding or saved).with_overrides(**overrides).checked(self.limits)
        self.preprocessing = manifest.preprocessing  # the encoder's definition, computed in numpy
        self.batch_size, self.decode_threads = batch_size, decode_threads
        self.state_count, self.context_count = manifest.state_count, manifest.context_count
        self.context_per_image = manifest.context_per_image
        self.calibrator = Calibrator.from_dict(manifest.confidence)

    def pixel_decoder(self) -> NumpyPixels:
        return NumpyPixels(self.preprocessing)

    def features(self, pixels: np.ndarray) -> np.ndarray:
        """Encoder features of a `(B, 3, S, S)` uint8 batch."""
        return self.encoder.run(None, {"images": pixels})[0]

    def decode_features(
        self, features: np.ndarray, config: DecodingConfig | None = None, places: list[int] | None = None
    ) -> Decoded:
        """Ranked captions for a batch of features, by the one search (`captioner.decoding.search.decode`, in
        NumPy); `places` seed each image's sampling stream (None: its row)."""
        config = config or self.decoding
        return decode(
            OnnxStepper(self, features),
            features.shape[0],
            config,
            self.special,
            NumpyOps(),
            config.max_words(self.vocabulary.max_length),
            self.vocabulary,
            places,
        )

    def describe_pixels(
        self, pixels: np.ndarray, config: DecodingConfig, attention: bool = False, styles: tuple[str, ...] = ()
    ) -> list[dict[str, Any]]:
        """`captioner.decoding.answers.describe` over the export's graphs (attention maps need the checkpoint: None
        here)."""
        return describe(ExportSide(self), np.ascontiguousarray(pixels), config, styles=styles)
