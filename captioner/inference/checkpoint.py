"""Captioner: captioning images with a trained checkpoint (PyTorch).

from captioner import Captioner
captioner = Captioner.from_checkpoint("best.ckpt")      # GPU when there is one
captioner.caption(["a.jpg", pil_image])                 # -> list[str]
captioner.predict(paths, num_beams=5)                   # -> [Prediction(image, caption, score, ...)]
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from captioner.core.errors import CaptionerError
from captioner.core.hardware import bf16_autocast_available
from captioner.decoding.config import DecodingConfig
from captioner.encoders.image_files import TorchPixels
from captioner.inference.engine import DEFAULT_DECODE_THREADS
from captioner.inference.protocol import ImageCaptioner
from captioner.models import captioning
from captioner.models.module import CaptionModel


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


class Captioner(ImageCaptioner):
    """Caption paths, bytes, PIL images, arrays or tensors with a trained `CaptionModel`, in batches, the next
    batches decoding while this one is captioned (`captioner.inference.engine`).

    Args:
        model: A model with its vocabulary (from `from_checkpoint` or a finished fit).
        batch_size: Images per forward pass.
        decoding: How to decode (None: the model's settings, which came from its checkpoint).
        decode_threads: Images decoded at once (PIL releases the interpreter while it decodes).
        compile_search: Step the decoder through `torch.compile` (CUDA graphs on a GPU).
        rerank_clip: A CLIP model (`ViT-B-32:openai`, another OpenCLIP `name:tag`, a Hugging Face id or folder, or a
            loaded `ClipModel`) that reorders the beam's alternatives by CLIPScore before the best is taken
            (`captioner.evaluation.clip_rerank`; with `num_beams` > 1). None: the model's own ranking.
        device_decode: Decode JPEGs on the GPU with nvJPEG (None: when the model is on a GPU).
        num_workers: captioner 0.3's name of `decode_threads`.
        overrides: Decoding settings changed from `decoding` (`num_beams=5`, `length_penalty=0.6`, ...).
    """

    def __init__(
        self,
        model: CaptionModel,
        batch_size: int = 32,
        decoding: DecodingConfig | None = None,
        decode_threads: int = DEFAULT_DECODE_THREADS,
        compile_search: bool = False,
        rerank_clip: Any = None,
        device_decode: bool | None = None,
        num_workers: int | None = None,
        **overrides: Any,
    ) -> None:
        if model.vocabulary is None:
            raise CaptionerError("This model has no vocabulary: load it from a checkpoint or train it first.")
        self.model = model.eval()
        self.batch_size, self.compile_search, self.device_decode = batch_size, compile_search, device_decode
        self.decode_threads = max(1, num_workers) if num_workers else decode_threads
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

    def pixel_decoder(self) -> TorchPixels:
        """PIL on the host, and on a GPU nvJPEG for JPEGs (`captioner.encoders.image_files.TorchPixels`)."""
        return TorchPixels(self.preprocessing, self.device, self.device_decode)

    def describe_pixels(
        self, pixels: torch.Tensor, config: DecodingConfig, attention: bool = False, styles: tuple[str, ...] = ()
    ) -> list[dict[str, Any]]:
        with torch.no_grad(), self._autocast():
            return captioning.describe(
                self.model, pixels, config, attention, self.compile_search, self.reranker, styles
            )

    def caption_tensor(self, images: torch.Tensor, **overrides) -> tuple[list[str], list[float]]:
        """Captions and scores for a `(B, 3, S, S)` uint8 batch already resized to the model's image size."""
        rows = self.describe_pixels(images, self.settings(**overrides))
        return [row["caption"] for row in rows], [row["score"] for row in rows]
