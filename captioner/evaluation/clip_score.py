"""CLIPScore and RefCLIPScore as the paper defines them (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation
Metric for Image Captioning"):

    CLIP-S(c, v)        = w * max(cos(E_image(v), E_text("A photo depicts " + c)), 0),  w = 2.5
    RefCLIP-S(c, R, v)  = harmonic mean of CLIP-S(c, v) and max(max_r cos(E_text(c), E_text(r)), 0)

(references written with the same prefix, as the paper's code does), averaged over images and reported x 100 like
the other metrics. The paper used CLIP ViT-B/32 (OpenCLIP `ViT-B-32`, pretrained `openai`: the default); any OpenCLIP
model (`name` or `name:pretrained_tag`) or Hugging Face CLIP/SigLIP (a hub id or a local folder) can be chosen,
their weights read from the hub's cache (offline, the error names the folder to seed). torchmetrics' `CLIPScore` is
not this: it omits the weight, the prefix and RefCLIP-S, so its numbers do not compare with published ones.

Image embeddings are kept in a small cache file per model (`cache_dir`), so a second evaluation of the same images
computes only the captions. Texts longer than the model's context are cut there, and counted (`truncated`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from captioner.core.errors import CaptionerError
from captioner.core.hub import hub_error
from captioner.core.parts import require_library

PAPER_MODEL = "ViT-B-32:openai"
PROMPT = "A photo depicts "
WEIGHT = 2.5


def clip_scores(images: np.ndarray, captions: np.ndarray, weight: float = WEIGHT) -> np.ndarray:
    """CLIP-S of each (image, caption) pair from L2-normalised embeddings, `(N, D)` each."""
    return weight * np.clip(np.sum(images * captions, axis=1), 0.0, None)


def ref_clip_scores(clip_s: np.ndarray, captions: np.ndarray, references: Sequence[np.ndarray]) -> np.ndarray:
    """RefCLIP-S: the harmonic mean of each caption's CLIP-S and its best reference cosine (clipped at 0).

    Args:
        clip_s: `(N,)` CLIP-S of the captions.
        captions: `(N, D)` normalised caption embeddings.
        references: Per caption, `(R_i, D)` normalised reference embeddings.
    """
    best = np.array(
        [
            max(float(np.max(refs @ caption)), 0.0) if len(refs) else 0.0
            for caption, refs in zip(captions, references, strict=True)
        ]
    )
    total = clip_s + best
    return np.where(total > 0, 2 * clip_s * best / np.where(total > 0, total, 1.0), 0.0)


class ClipModel:
    """A CLIP model's image and text embeddings (L2-normalised), from OpenCLIP or Hugging Face.

    Args:
        name: `ViT-B-32:openai` (OpenCLIP name and pretrained tag; the paper's), another OpenCLIP `name:tag`, or a
            Hugging Face id or folder (openai/clip-vit-base-patch32, google/siglip-base-patch16-224, ./my-clip).
        device: Where it runs.
        batch_size: Images or texts per forward pass.
    """

    def __init__(self, name: str = PAPER_MODEL, device: str | torch.device = "cpu", batch_size: int = 64) -> None:
        self.name, self.device, self.batch_size = name, torch.device(device), batch_size
        if _is_open_clip(name):
            self._load_open_clip(*name.split(":", 1))
        else:
            self._load_hugging_face(name)

    # ------------------------------------------------------------ loading
    def _load_open_clip(self, model_name: str, tag: str) -> None:
        from captioner.encoders.open_clip_models import OpenClipEncoder

        open_clip = require_library("open_clip", "clip", "CLIPScore with an OpenCLIP model")
        self.images = OpenClipEncoder(model_name, tag)
        try:
            model = open_clip.create_model(model_name, pretrained=tag)
        except Exception as error:  # urllib, the hub client and torch.load all fail differently when offline
            source = open_clip.get_pretrained_cfg(model_name, tag)
            repo = (source.get("hf_hub") or "").strip("/") or f"{model_name}/{tag}"
            raise hub_error(repo, error, extra=" (or, for weights served by URL, into ~/.cache/clip)") from error
        self.images.visual.load_state_dict(model.visual.state_dict())
        tokenizer = open_clip.get_tokenizer(model_name)
        self.context = int(getattr(tokenizer, "context_length", 77))
        self._model = model.eval().to(self.device)

        def encode(texts: list[str]) -> tuple[torch.Tensor, int]:
            inner = getattr(tokenizer, "tokenizer", tokenizer)
            # Start and end tokens take two places: a text of more pieces than the rest is cut.
            cut = sum(len(inner.encode(text)) > self.context - 2 for text in texts) if hasattr(inner, "encode") else 0
            return self._model.encode_text(tokenizer(texts).to(self.device)), cut

        self._encode_texts = encode

    def _load_hugging_face(self, name: str) -> None:
        from captioner.encoders.hugging_face import HuggingFaceEncoder

        transformers = require_library("transformers", "hf", "CLIPScore with a Hugging Face model")
        self.images = HuggingFaceEncoder(model_id=name)
        try:
            model = transformers.AutoModel.from_pretrained(name)
            tokenizer = transformers.AutoTokenizer.from_pretrained(name)
        except Exception as error:  # the hub client raises many types when offline
            raise hub_error(name, error) from error
        if not hasattr(model, "get_text_features"):
            raise CaptionerError(
                f"{name} is not a CLIP-style model (it has no text tower): choose a CLIP or SigLIP model for CLIPScore."
            )
        self.images.fetch_pretrained()
        text_config = getattr(model.config, "text_config", model.config)
        self.context = int(getattr(text_config, "max_position_embeddings", 77))
        self._model = model.eval().to(self.device)

        def encode(texts: list[str]) -> tuple[torch.Tensor, int]:
            lengths = [len(ids) for ids in tokenizer(texts, truncation=False)["input_ids"]]
            padding = "max_length" if "siglip" in model.config.model_type else True  # SigLIP was trained padded
            batch = tokenizer(texts, padding=padding, truncation=True, max_length=self.context, return_tensors="pt")
            batch = batch.to(self.device)
            inputs = {key: value for key, value in batch.items() if key in ("input_ids", "attention_mask")}
            features = self._model.get_text_features(**inputs)
            features = getattr(features, "pooler_output", features)  # transformers 5 returns an output object
            return features, sum(length > self.context for length in lengths)

        self._encode_texts = encode

    # ------------------------------------------------------------ embeddings
    @property
    def key(self) -> str:
        """What identifies this model's embeddings (its name, for the cache's file name)."""
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in self.name)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> tuple[np.ndarray, int]:
        """`(N, D)` normalised embeddings of `texts`, and how many were cut at the model's context."""
        parts, truncated = [], 0
        for start in range(0, len(texts), self.batch_size):
            embeddings, cut = self._encode_texts(list(texts[start : start + self.batch_size]))
            parts.append(torch.nn.functional.normalize(embeddings.float(), dim=-1).cpu().numpy())
            truncated += cut
        return (np.concatenate(parts) if parts else np.zeros((0, 1), np.float32)), truncated

    @torch.no_grad()
    def embed_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """`(B, D)` normalised embeddings of a `(B, 3, H, W)` uint8 batch (another model's input), brought to CLIP's
        input by its own resize and crop."""
        encoder = self.images.eval().to(self.device)
        parts = []
        for start in range(0, len(pixels), self.batch_size):
            batch = encoder.preprocessing.resize_tensor(pixels[start : start + self.batch_size].to(self.device))
            parts.append(torch.nn.functional.normalize(encoder(batch, grid=False).float(), dim=-1).cpu().numpy())
        return np.concatenate(parts) if parts else np.zeros((0, 1), np.float32)

    @torch.no_grad()
    def embed_images(self, paths: Sequence[str | Path], cache_dir: str | Path | None = None) -> np.ndarray:
        """`(N, D)` normalised embeddings of image files, read from and added to `cache_dir`'s file for this model."""
        cache = _EmbeddingCache(Path(cache_dir) / f"clip-{self.key}.npz") if cache_dir else None
        known = cache.read() if cache else {}
        missing = [str(path) for path in dict.fromkeys(map(str, paths)) if _identity(path) not in known]
        encoder = self.images.eval().to(self.device)
        for start in range(0, len(missing), self.batch_size):
            batch = missing[start : start + self.batch_size]
            pixels = torch.stack([encoder.preprocessing.from_file(path) for path in batch]).to(self.device)
            embeddings = torch.nn.functional.normalize(encoder(pixels, grid=False).float(), dim=-1).cpu().numpy()
            known.update({_identity(path): row for path, row in zip(batch, embeddings, strict=True)})
        if cache and missing:
            cache.write(known)
        return np.stack([known[_identity(path)] for path in paths]) if len(paths) else np.zeros((0, 1), np.float32)


def _is_open_clip(name: str) -> bool:
    """`name:tag` (or a bare OpenCLIP model name) is OpenCLIP's; a hub id (org/name) or a folder is Hugging Face's."""
    return "/" not in name and not Path(name).exists()


def _identity(path: str | Path) -> str:
    """A file's cache key: its resolved path, size and modification time (a changed file is embedded again)."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return hashlib.sha1(f"{resolved}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()


class _EmbeddingCache:
    """One `.npz` of embeddings by file identity, written atomically and checked on read."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> dict[str, np.ndarray]:
        if not self.path.is_file():
            return {}
        try:
            with np.load(self.path) as stored:
                keys, rows = json.loads(str(stored["keys"])), stored["rows"]
            if len(keys) != len(rows):
                raise ValueError("keys and rows differ in number")
        except (OSError, ValueError, KeyError) as error:  # a damaged cache is recomputed, not trusted
            import logging

            logging.getLogger("captioner").warning(
                "Ignoring the damaged CLIP embedding cache %s (%s).", self.path, error
            )
            return {}
        return dict(zip(keys, rows, strict=True))

    def write(self, embeddings: Mapping[str, np.ndarray]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial.npz")
        np.savez(partial, keys=np.array(json.dumps(list(embeddings))), rows=np.stack(list(embeddings.values())))
        os.replace(partial, self.path)


def write_random_clip(folder: str | Path, words: Sequence[str], seed: int = 0) -> Path:
    """A small CLIP with random weights saved as the hub gives one (config and weights, an image processor, a
    word-level tokenizer of `words`), for offline demos and tests: its scores exercise the metric, they mean nothing
    about captions."""
    tokenizers = require_library("tokenizers", "hf", "a random CLIP")
    transformers = require_library("transformers", "hf", "a random CLIP")
    folder = Path(folder)
    vocabulary = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocabulary.update({word: index + 4 for index, word in enumerate(sorted({w.lower() for w in words}))})
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocabulary, unk_token="<unk>"))
    tokenizer.normalizer = tokenizers.normalizers.Lowercase()
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(folder)
    config = transformers.CLIPConfig(
        text_config={
            "vocab_size": len(vocabulary),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        transformers.CLIPModel(config).save_pretrained(folder)
    finally:
        torch.random.set_rng_state(generator_state)
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(folder)
    return folder


def score_captions(
    model: ClipModel,
    captions: Mapping[str, str],
    images: Mapping[str, str | Path],
    references: Mapping[str, Sequence[str]] | None = None,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """CLIP-S (and with references RefCLIP-S) of each image's caption, and their means x 100.

    Args:
        model: The CLIP model.
        captions: Image -> generated caption.
        images: Image -> its file (images without one are left out, and counted).
        references: Image -> reference captions, for RefCLIP-S.
        cache_dir: Where image embeddings are kept between evaluations.
    """
    keys = [key for key in captions if key in images]
    image_embeddings = model.embed_images([images[key] for key in keys], cache_dir)
    caption_embeddings, truncated = model.embed_texts([PROMPT + captions[key] for key in keys])
    clip_s = clip_scores(image_embeddings, caption_embeddings)
    per_image = {key: float(score) for key, score in zip(keys, clip_s, strict=True)}
    result: dict[str, Any] = {
        "model": model.name,
        "images": len(keys),
        "without_image": len(captions) - len(keys),
        "CLIPScore": 100 * float(clip_s.mean()) if keys else 0.0,
        "per_image": per_image,
    }
    if references:
        texts = [PROMPT + reference for key in keys for reference in references.get(key, ())]
        embedded, cut = model.embed_texts(texts)
        truncated += cut
        groups, start = [], 0
        for key in keys:
            count = len(references.get(key, ()))
            groups.append(embedded[start : start + count])
            start += count
        ref = ref_clip_scores(clip_s, caption_embeddings, groups)
        result["RefCLIPScore"] = 100 * float(ref.mean()) if keys else 0.0
    result["truncated"] = truncated
    return result
