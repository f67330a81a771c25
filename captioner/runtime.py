"""A captioner for exported folders that needs only ONNX Runtime, NumPy and Pillow: no torch, no Lightning.

    from captioner.runtime import OnnxCaptioner
    captioner = OnnxCaptioner("captioner-onnx/")
    captioner.caption(["a.jpg", "b.png"])           # -> list[str]
    captioner.predict(paths)                         # -> [Prediction(source, caption, score, error)]

The folder (written by `python -m captioner export`) holds the encoder, the
decoder's `prepare` and `step` graphs, the vocabulary, the preprocessing and
the decoding settings, each file checked against the manifest's digest when it
is loaded. Search runs here in NumPy through the same code as the PyTorch
captioner's (`captioner.decoding.search`, with `captioner.decoding.ops.NumpyOps`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from captioner.core.errors import CaptionerError
from captioner.core.pixels import image_places, open_image, preprocess_array, to_rgb
from captioner.decoding.answers import answer_rows
from captioner.decoding.confidence import Calibrator, caption_confidences
from captioner.decoding.config import DecodingConfig, ModelLimits, SpecialTokens
from captioner.decoding.ops import NumpyOps
from captioner.decoding.rules import rules_for
from captioner.decoding.search import Decoded, decode
from captioner.predictions import Prediction, captions_or_error, predict_in_batches
from captioner.text.base import tokenizer_from_dict

EXPORT_VERSION = 3
# Version 1: ResNet exports of captioner 0.2, squashed images; 1 and 2: the step graph gives log-probabilities with
# the special tokens masked (version 3 gives logits; the search's rules and normalisation treat both alike).
READABLE_VERSIONS = (1, 2, EXPORT_VERSION)
MANIFEST = "manifest.json"
README = "README.md"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_manifest(folder: str | Path) -> dict:
    """The folder's manifest, with the folder checked as a whole against it.

    Every graph the runtime opens is listed with its SHA-256, every file in the
    folder besides the manifest and its README is listed, every listed file is
    there, unaltered, and no name leads out of the folder.

    Raises:
        CaptionerError: Naming the missing, extra, altered or escaping file, or the unreadable manifest.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise CaptionerError(f"{folder} is not an exported captioner: it has no {MANIFEST}.")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise CaptionerError(f"{path} is not valid JSON ({error}); export the model again.") from error
    if not isinstance(manifest, dict) or manifest.get("version") not in READABLE_VERSIONS:
        raise CaptionerError(f"{path} is of another export version; export the model again with this captioner.")
    files, graphs = manifest.get("files"), manifest.get("graphs")
    if not isinstance(files, dict) or not isinstance(graphs, dict):
        raise CaptionerError(f"{path} lists no files or graphs; export the model again.")
    for name in [*files, *graphs.values()]:
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise CaptionerError(f"{path} names {name!r}, which is not a file inside the folder: refused.")
    for graph, name in graphs.items():
        if name not in files:
            raise CaptionerError(f"The {graph} graph {name} is not listed with a digest in {path}: refused.")
    extra = sorted(p.name for p in folder.iterdir() if p.name not in (MANIFEST, README) and p.name not in files)
    if extra:
        raise CaptionerError(f"{folder} holds {', '.join(extra)}, which its manifest does not list: refused. "
                             "Export the model again into an empty folder.")  # fmt: skip
    for name, digest in files.items():
        file = folder / name
        if not file.is_file():
            raise CaptionerError(f"{folder} lacks {name}, which its manifest lists; export the model again.")
        if _digest(file) != digest:
            raise CaptionerError(f"{file} was altered since export (its SHA-256 differs from the manifest's).")
    return manifest


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


class OnnxCaptioner:
    """Caption images with an exported folder, on the CPU (or another ONNX Runtime provider).

    Args:
        folder: Written by `python -m captioner export`.
        batch_size: Images per encoder and decoder run.
        providers: ONNX Runtime execution providers (None: the CPU).
        threads: Threads per session (None: ONNX Runtime's choice).
        decoding: How to decode (None: the export's settings).
        overrides: Decoding settings changed from those (`num_beams=5`, ...; the 0.2 name `beam_size` works too).
    """

    def __init__(self, folder: str | Path, batch_size: int = 32, providers: Sequence[str] | None = None,
                 threads: int | None = None, decoding: DecodingConfig | None = None, **overrides) -> None:  # fmt: skip
        import onnxruntime

        self.folder = Path(folder)
        self.manifest = manifest = read_manifest(self.folder)
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        providers = list(providers or ["CPUExecutionProvider"])

        def session(name: str):
            return onnxruntime.InferenceSession(str(self.folder / manifest["graphs"][name]), options,
                                                providers=providers)  # fmt: skip

        self.encoder, self.prepare, self.step = session("encoder"), session("prepare"), session("step")
        self.step_inputs = {item.name for item in self.step.get_inputs()}
        # Only captioner's own tokenizers: the folder may come from anyone, and nothing it names is imported.
        self.vocabulary = tokenizer_from_dict(manifest["vocabulary"], str(self.folder / MANIFEST), built_in_only=True)
        self.special = SpecialTokens.of(self.vocabulary)
        saved = DecodingConfig.from_dict(manifest["decoding"], str(self.folder / MANIFEST))
        # Exports before 0.4 do not record the decoder's limit: their graphs fail on their own past it.
        self.limits = ModelLimits(len(self.vocabulary), self.vocabulary.max_length, manifest.get("longest_caption"),
                                  manifest["decoder"]["class_path"].rsplit(".", 1)[-1], self.vocabulary.stoi,
                                  self.vocabulary)  # fmt: skip
        self.decoding = (decoding or saved).with_overrides(**overrides).checked(self.limits)
        self.preprocessing = manifest["preprocessing"]  # the encoder's definition, computed in numpy
        self.batch_size = batch_size
        self.state_count, self.context_count = manifest["state_count"], manifest["context_count"]
        self.context_per_image = manifest["context_per_image"]
        self.calibrator = Calibrator.from_dict(manifest.get("confidence"))  # exports before 0.3: none

    # ------------------------------------------------------------ images
    def _pixels(self, source) -> np.ndarray:
        """A path, bytes or PIL image as a `(3, S, S)` uint8 array, preprocessed as in training."""
        if isinstance(source, Image.Image):
            image = to_rgb(source)
        elif isinstance(source, (bytes, bytearray)):
            image = open_image(bytes(source))
        else:
            image = open_image(Path(source).read_bytes())
        return preprocess_array(np.asarray(image), self.preprocessing)

    def pixels_from_bytes(self, data: bytes, max_pixels: int | None = None) -> np.ndarray:
        """An image file's bytes as the encoder's `(3, S, S)` uint8 input (the full-size picture is not kept).

        Raises:
            One of `captioner.core.pixels.DECODE_ERRORS` (`TooManyPixelsError`, `UnsupportedFormatError`, ...).
        """
        return preprocess_array(np.asarray(open_image(data, max_pixels)), self.preprocessing)

    def features(self, pixels: np.ndarray) -> np.ndarray:
        """Encoder features of a `(B, 3, S, S)` uint8 batch."""
        return self.encoder.run(None, {"images": pixels})[0]

    # ------------------------------------------------------------ search
    def settings(self, **overrides) -> DecodingConfig:
        """This captioner's decoding settings with `overrides`, checked against the model.

        Raises:
            CaptionerError: Naming a setting that is unknown, out of range, or more than the model can do.
        """
        return self.decoding.with_overrides(**overrides).checked(self.limits)

    def decode_features(self, features: np.ndarray, config: DecodingConfig | None = None,
                        places: list[int] | None = None) -> Decoded:  # fmt: skip
        """Ranked captions for a batch of features, by the one search (`captioner.decoding.search.decode`, in
        NumPy); `places` seed each image's sampling stream (None: its row)."""
        config = config or self.decoding
        return decode(OnnxStepper(self, features), features.shape[0], config, self.special, NumpyOps(),
                      config.max_words(self.vocabulary.max_length), self.vocabulary, places)  # fmt: skip

    def caption_pixels(self, pixels: np.ndarray, **overrides) -> tuple[list[str], list[float]]:
        """Captions and log-probabilities of a `(B, 3, S, S)` uint8 batch (sampling: each image's stream seeded by
        its pixels, as the PyTorch captioner's)."""
        config = self.settings(**overrides)
        decoded = self.decode_features(self.features(pixels), config,
                                       image_places(pixels) if config.do_sample else None)  # fmt: skip
        return self.vocabulary.decode_batch(decoded.best_tokens), [float(s) for s in decoded.best_scores]

    # ------------------------------------------------------------ the Captioner interface
    def iter_predict(self, images: Iterable, **overrides) -> Iterator[Prediction]:
        """Caption paths, bytes or PIL images batch by batch; an unreadable one gets an error, the rest go on."""
        yield from predict_in_batches(list(images), self.batch_size, self._pixels,
                                      lambda pixels: self.caption_pixels(np.stack(pixels), **overrides))  # fmt: skip

    def predict(self, images: Iterable, **overrides) -> list[Prediction]:
        """Caption every image; unreadable ones get an error instead of stopping the rest."""
        return list(self.iter_predict(images, **overrides))

    def caption(self, images, **overrides) -> list[str]:
        """Captions for one image or a list of them (`overrides`: decoding settings for this call).

        Raises:
            CaptionerError: Naming the first image that could not be read.
        """
        if isinstance(images, (str, Path, Image.Image, bytes)):
            images = [images]
        return captions_or_error(self.predict(images, **overrides))

    def describe(self, images: Sequence[Image.Image | np.ndarray], attention: bool = False, **overrides) -> list[dict]:
        """What the server returns for decoded images (or their `pixels_from_bytes` arrays): caption, score and,
        with `num_return` > 1, the ranked alternatives (attention maps need the checkpoint: None here)."""
        config = self.settings(**overrides)
        pixels = np.stack([self._pixels(image) if isinstance(image, Image.Image) else image for image in images])
        features = self.features(pixels)
        places = image_places(pixels) if config.do_sample else None
        decoded = self.decode_features(features, config, places)
        confidences = None
        if self.calibrator is not None:
            rules = rules_for(config, self.special, self.vocabulary, config.max_words(self.vocabulary.max_length))
            confidences = caption_confidences(self.calibrator, OnnxStepper(self, features), decoded,
                                              self.special.start, NumpyOps(), rules)  # fmt: skip
        rows = answer_rows(decoded, self.vocabulary, config.num_return, confidences)
        return [{**row, "attention": None} for row in rows]
