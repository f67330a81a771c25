"""Captioner: the Python API for captioning images with a trained checkpoint.

from captioner import Captioner
cap = Captioner.from_checkpoint("best.ckpt")      # GPU when there is one
cap.caption(["a.jpg", pil_image])                 # -> list[str]
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader

from captioner.core.errors import CaptionerError
from captioner.core.hardware import bf16_autocast_available
from captioner.decoding.config import DecodingConfig
from captioner.encoders.image_files import ImageFileDataset, collate_images, load_any_image
from captioner.models import captioning
from captioner.models.module import CaptionModel
from captioner.predictions import Prediction, captions_or_error, predict_in_batches

ImageSource = str | Path | bytes | Image.Image | torch.Tensor


def attention_as_lists(row: dict) -> dict:
    """A `describe` row with its attention maps as plain lists (JSON-ready), or None."""
    maps = row.pop("attention", None)
    row["attention"] = None
    if maps is not None:
        words = [*row["caption"].split(), "<end>"][: len(maps)]
        row["attention"] = {"words": words, "grid": list(maps.shape[1:]),
                            "weights": [[round(float(v), 5) for v in word.flatten()] for word in maps]}  # fmt: skip
    return row


def default_device() -> torch.device:
    """The first GPU if there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_checkpoint_model(path: str | Path, device: torch.device | str | None = None, **overrides) -> CaptionModel:
    """Load a `CaptionModel` from a checkpoint file, ready for inference on `device` (default: a GPU if any).

    Args:
        path: A checkpoint written by `fit`.
        device: Where to run.
        overrides: Decoding settings replacing the checkpoint's (`num_beams`, `length_penalty`, ...; see
            `captioner.decoding.DecodingConfig`).

    Raises:
        CaptionerError: When the file is missing or is not a captioner checkpoint.
    """
    return CaptionModel.from_checkpoint(str(path), **overrides).to(device or default_device()).eval()


class Captioner:
    """Caption paths, PIL images or tensors with a trained `CaptionModel`, in batches.

    Args:
        model: A model with its vocabulary (from `from_checkpoint` or a finished fit).
        batch_size: Images per forward pass.
        decoding: How to decode (None: the model's settings, which came from its checkpoint).
        num_workers: Worker processes decoding image files (0: in this process).
        compile_search: Step the decoder through `torch.compile` (CUDA graphs on a GPU).
        rerank_clip: A CLIP model (`ViT-B-32:openai`, another OpenCLIP `name:tag`, a Hugging Face id or folder, or a
            loaded `ClipModel`) that reorders the beam's alternatives by CLIPScore before the best is taken
            (`captioner.evaluation.clip_rerank`; with `num_beams` > 1). None: the model's own ranking.
        overrides: Decoding settings changed from `decoding` (`num_beams=5`, `length_penalty=0.6`, ...).
    """

    def __init__(self, model: CaptionModel, batch_size: int = 32, decoding: DecodingConfig | None = None,
                 num_workers: int = 0, compile_search: bool = False, rerank_clip: Any = None,
                 **overrides) -> None:  # fmt: skip
        if model.vocabulary is None:
            raise CaptionerError("This model has no vocabulary: load it from a checkpoint or train it first.")
        self.model = model.eval()
        self.batch_size, self.num_workers, self.compile_search = batch_size, num_workers, compile_search
        self.limits = model.limits
        self.decoding = (decoding or model.decoding).with_overrides(**overrides).checked(self.limits)
        self.preprocessing = model.preprocessing
        self.reranker = None
        if rerank_clip is not None:
            from captioner.evaluation.clip_rerank import ClipReranker

            self.reranker = ClipReranker(rerank_clip, model.device)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: torch.device | str | None = None, **kwargs) -> Captioner:
        """Load a checkpoint (on the GPU when there is one, else the CPU); `kwargs` go to `Captioner`."""
        return cls(load_checkpoint_model(path, device), **kwargs)

    @classmethod
    def from_pretrained(cls, name: str | Path, device: torch.device | str | None = None, **kwargs) -> Captioner:
        """Load a published captioner (`python -m captioner publish`): a folder, or a Hugging Face Hub id (downloaded
        once; offline, read from the hub's cache). `kwargs` go to `Captioner`.

        Raises:
            CaptionerError: When it can be neither found nor read.
        """
        from captioner.published import model_from_published

        return cls(model_from_published(name).to(device or default_device()).eval(), **kwargs)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _autocast(self):
        if self.device.type == "cuda" and bf16_autocast_available(self.device):
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def settings(self, **overrides) -> DecodingConfig:
        """This captioner's decoding settings with `overrides`, checked against the model.

        Raises:
            CaptionerError: Naming a setting that is unknown, out of range, or more than the model can do.
        """
        return self.decoding.with_overrides(**overrides).checked(self.limits)

    def caption_tensor(self, images: torch.Tensor, **overrides) -> tuple[list[str], list[float]]:
        """Captions and scores for a `(B, 3, S, S)` uint8 batch already resized to the model's image size."""
        with torch.no_grad(), self._autocast():
            rows = captioning.describe(self.model, images, self.settings(**overrides), compiled=self.compile_search,
                                       reranker=self.reranker)  # fmt: skip
        return [row["caption"] for row in rows], [row["score"] for row in rows]

    def pixels_from_bytes(self, data: bytes, max_pixels: int | None = None) -> torch.Tensor:
        """An image file's bytes as the encoder's `(3, S, S)` uint8 input (the full-size picture is not kept).

        Raises:
            One of `captioner.core.pixels.DECODE_ERRORS` (`TooManyPixelsError` over `max_pixels`,
            `UnsupportedFormatError` for formats outside `ACCEPTED_FORMATS`).
        """
        return self.preprocessing.from_file(data, max_pixels)

    def describe(self, images: Sequence[Image.Image | torch.Tensor], attention: bool = False,
                 **overrides) -> list[dict]:  # fmt: skip
        """Everything the model can say about images, one dict per image (what the server returns).

        Args:
            images: Decoded PIL images (any mode), or their `pixels_from_bytes` tensors.
            attention: Also return, for decoders that attend over a grid of regions, where each word looked.
            overrides: Decoding settings for this call (`num_return=3` for ranked alternatives, ...).

        Returns:
            Dicts with `caption`, `score` (log-probability), `alternatives` (with `num_return` > 1:
            `[{"caption", "score"}]`, best first) and `attention`
            (`{"words", "grid": [rows, columns], "weights": one list of rows*columns per word}` or None).
        """
        batch = torch.stack([self.preprocessing.from_pil(image) if isinstance(image, Image.Image) else image
                             for image in images])  # fmt: skip
        with torch.no_grad(), self._autocast():
            rows = captioning.describe(self.model, batch, self.settings(**overrides), attention, self.compile_search,
                                       self.reranker)  # fmt: skip
        return [attention_as_lists(row) for row in rows]

    def predict(self, images: Iterable[ImageSource], **overrides) -> list[Prediction]:
        """Caption every image; unreadable ones get an error instead of stopping the rest (`overrides`: decoding
        settings for this call)."""
        return list(self.iter_predict(images, **overrides))

    def iter_predict(self, images: Iterable[ImageSource], **overrides) -> Iterator[Prediction]:
        """Like `predict`, yielding results batch by batch (for long lists of files)."""
        items = list(images)
        if items and all(isinstance(item, (str, Path)) for item in items):
            yield from self._predict_files([Path(item) for item in items], overrides)
            return
        yield from predict_in_batches(
            items,
            self.batch_size,
            lambda item: load_any_image(item, self.preprocessing),
            lambda tensors: self.caption_tensor(torch.stack(tensors), **overrides),
        )

    def _predict_files(self, paths: Sequence[Path], overrides: dict) -> Iterator[Prediction]:
        loader = DataLoader(
            ImageFileDataset(paths, self.preprocessing),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=collate_images,
            pin_memory=self.device.type == "cuda",
        )
        for batch in loader:
            captions: dict[int, tuple[str, float]] = {}
            if batch["ok"]:
                texts, scores = self.caption_tensor(batch["images"], **overrides)
                captions = dict(zip(batch["ok"], zip(texts, scores)))
            for position, path in zip(batch["positions"], batch["paths"]):
                if position in captions:
                    yield Prediction(path, *captions[position])
                else:
                    yield Prediction(path, None, None, batch["errors"][position])

    def caption(self, images: ImageSource | Sequence[ImageSource], **overrides) -> list[str]:
        """Captions for one image or a list of them (`overrides`: decoding settings for this call, e.g.
        `num_beams=5`).

        Raises:
            CaptionerError: Naming the first image that could not be read.
        """
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            images = list(images)
        elif isinstance(images, (str, Path, bytes, Image.Image, torch.Tensor)):
            images = [images]
        return captions_or_error(self.predict(images, **overrides))
