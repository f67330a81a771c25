"""A captioner for exported folders that needs only ONNX Runtime, NumPy and Pillow: no torch, no Lightning.

    from captioner.runtime import OnnxCaptioner
    captioner = OnnxCaptioner("captioner-onnx/")
    captioner.caption(["a.jpg", "b.png"])           # -> list[str]
    captioner.predict(paths)                         # -> [Prediction(source, caption, score, error)]

The folder (written by `python -m captioner export`) holds the encoder, the
decoder's `prepare` and `step` graphs, the vocabulary, the preprocessing and
the decoding settings, each file checked against the manifest's digest when it
is loaded. Search (greedy and beam, batched over images and beams) runs here in
NumPy, the same algorithm as `captioner.models.search`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from captioner.data.vocab import Vocabulary
from captioner.errors import CaptionerError
from captioner.pixels import open_image, preprocess_array, to_rgb
from captioner.predictions import Prediction, captions_or_error, predict_in_batches

EXPORT_VERSION = 2
READABLE_VERSIONS = (1, EXPORT_VERSION)  # version 1: ResNet exports of captioner 0.2, squashed images
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


class OnnxCaptioner:
    """Caption images with an exported folder, on the CPU (or another ONNX Runtime provider).

    Args:
        folder: Written by `python -m captioner export`.
        beam_size: Beams per image (None: the export's setting; 1: greedy).
        batch_size: Images per encoder and decoder run.
        providers: ONNX Runtime execution providers (None: the CPU).
        threads: Threads per session (None: ONNX Runtime's choice).
    """

    def __init__(self, folder: str | Path, beam_size: int | None = None, batch_size: int = 32,
                 providers: Sequence[str] | None = None, threads: int | None = None) -> None:  # fmt: skip
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
        self.vocabulary = Vocabulary.from_dict(manifest["vocabulary"], str(self.folder / MANIFEST))
        self.pad, self.start, self.end = Vocabulary.pad_index, Vocabulary.start_index, Vocabulary.end_index
        decoding = manifest["decoding"]
        self.beam_size = decoding["beam_size"] if beam_size is None else beam_size
        self.length_penalty = float(decoding["length_penalty"])
        self.max_length = int(decoding["max_decode_length"] or self.vocabulary.max_length)
        self.preprocessing = manifest["preprocessing"]  # the encoder's definition, computed in numpy
        self.batch_size = batch_size
        self.state_count, self.context_count = manifest["state_count"], manifest["context_count"]
        self.context_per_image = manifest["context_per_image"]

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
            One of `captioner.pixels.DECODE_ERRORS` (`TooManyPixelsError`, `UnsupportedFormatError`, ...).
        """
        return preprocess_array(np.asarray(open_image(data, max_pixels)), self.preprocessing)

    def features(self, pixels: np.ndarray) -> np.ndarray:
        """Encoder features of a `(B, 3, S, S)` uint8 batch."""
        return self.encoder.run(None, {"images": pixels})[0]

    # ------------------------------------------------------------ search
    def _log_probs(self, tokens: np.ndarray, state: list, context: list) -> tuple[np.ndarray, list]:
        feeds = {"tokens": tokens.astype(np.int64)}
        feeds.update({f"state{i}": part for i, part in enumerate(state)})
        feeds.update({f"context{i}": part for i, part in enumerate(context)})
        outputs = self.step.run(None, {name: value for name, value in feeds.items() if name in self.step_inputs})
        return outputs[0], outputs[1:]  # `<pad>`, `<start>` and `<unk>` are masked inside the graph

    def _start(self, features: np.ndarray, rows_per_image: int) -> tuple[list, list]:
        outputs = self.prepare.run(None, {"features": features})
        context, state = outputs[: self.context_count], outputs[self.context_count :]
        state = [np.repeat(part, rows_per_image, axis=0) for part in state]
        if not self.context_per_image:
            context = [np.repeat(part, rows_per_image, axis=0) for part in context]
        return state, context

    def greedy(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Greedy captions: tokens `(B, T)`, total log-probabilities `(B,)` and lengths `(B,)` (with `<end>`)."""
        batch = features.shape[0]
        state, context = self._start(features, 1)
        previous = np.full(batch, self.start, dtype=np.int64)
        finished = np.zeros(batch, dtype=bool)
        scores, lengths, steps = np.zeros(batch, dtype=np.float32), np.zeros(batch, dtype=np.int64), []
        for _ in range(self.max_length + 1):
            log_probs, state = self._log_probs(previous, state, context)
            token = log_probs.argmax(axis=1)
            picked = log_probs[np.arange(batch), token]
            token = np.where(finished, self.pad, token)
            scores += np.where(finished, np.float32(0.0), picked)  # float32 sums, as torch's search
            lengths += ~finished
            steps.append(token)
            finished |= token == self.end
            previous = token
            if finished.all():
                break
        return np.stack(steps, axis=1), scores, lengths

    def _normalised(self, scores: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        if self.length_penalty == 0:
            return scores
        return scores / ((5.0 + lengths) / 6.0) ** self.length_penalty

    def beam(self, features: np.ndarray, beam_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Beam search, the greedy caption kept as a candidate (as in `captioner.models.search.beam_search`)."""
        return self.beams(features, beam_size)[0]

    def beams(self, features: np.ndarray, beam_size: int):
        """Beam search: the best caption per image (tokens, log-probabilities, lengths), and every final beam ranked
        best first (tokens `(B, beams, T)` and log-probabilities `(B, beams)`; None for greedy decoding)."""
        greedy = self.greedy(features)
        if beam_size <= 1:
            return greedy, None
        batch, k = features.shape[0], beam_size
        state, context = self._start(features, k)
        scores = np.full((batch, k), -np.inf, dtype=np.float32)
        scores[:, 0] = 0.0
        previous = np.full(batch * k, self.start, dtype=np.int64)
        finished = np.zeros((batch, k), dtype=bool)
        lengths = np.zeros((batch, k), dtype=np.int64)
        history = np.zeros((batch, k, 0), dtype=np.int64)
        offsets = (np.arange(batch) * k)[:, None]
        for _ in range(self.max_length + 1):
            log_probs, state = self._log_probs(previous, state, context)
            vocab = log_probs.shape[-1]
            log_probs = log_probs.reshape(batch, k, vocab)
            done_row = np.full(vocab, -np.inf, dtype=np.float32)
            done_row[self.pad] = 0.0
            log_probs = np.where(finished[..., None], done_row, log_probs)
            candidates = (scores[..., None] + log_probs).reshape(batch, k * vocab)
            top = np.argpartition(-candidates, k - 1, axis=1)[:, :k]  # the k best, unordered: no full sort
            top_scores = np.take_along_axis(candidates, top, axis=1)
            ranking = np.argsort(-top_scores, axis=1, kind="stable")
            flat, scores = np.take_along_axis(top, ranking, axis=1), np.take_along_axis(top_scores, ranking, axis=1)
            beam, token = flat // vocab, flat % vocab
            history = np.concatenate([np.take_along_axis(history, beam[..., None], axis=1), token[..., None]], 2)
            was_finished = np.take_along_axis(finished, beam, axis=1)
            lengths = np.take_along_axis(lengths, beam, axis=1) + ~was_finished
            finished = was_finished | (token == self.end)
            order = (beam + offsets).reshape(-1)
            state = [part[order] for part in state]
            previous = token.reshape(-1)
            if finished.all():
                break
        ranked = self._normalised(scores, lengths)
        order = np.argsort(-ranked, axis=1, kind="stable")
        all_beams = (np.take_along_axis(history, order[..., None], axis=1), np.take_along_axis(scores, order, axis=1))
        best = ranked.argmax(axis=1)
        rows = np.arange(batch)
        tokens, best_scores, best_lengths = history[rows, best], scores[rows, best], lengths[rows, best]
        greedy_tokens, greedy_scores, greedy_lengths = greedy
        wins = self._normalised(greedy_scores, greedy_lengths) > ranked[rows, best]
        width = max(tokens.shape[1], greedy_tokens.shape[1])
        pad = lambda t: np.pad(t, ((0, 0), (0, width - t.shape[1])), constant_values=self.pad)  # noqa: E731
        best_result = (np.where(wins[:, None], pad(greedy_tokens), pad(tokens)), np.where(wins, greedy_scores,
                       best_scores), np.where(wins, greedy_lengths, best_lengths))  # fmt: skip
        return best_result, all_beams

    def caption_pixels(self, pixels: np.ndarray, beam_size: int | None = None) -> tuple[list[str], list[float]]:
        """Captions and log-probabilities of a `(B, 3, S, S)` uint8 batch."""
        tokens, scores, _ = self.beam(self.features(pixels), self.beam_size if beam_size is None else beam_size)
        return self.vocabulary.decode_batch(tokens), [float(s) for s in scores]

    # ------------------------------------------------------------ the Captioner interface
    def iter_predict(self, images: Iterable) -> Iterator[Prediction]:
        """Caption paths, bytes or PIL images batch by batch; an unreadable one gets an error, the rest go on."""
        yield from predict_in_batches(list(images), self.batch_size, self._pixels,
                                      lambda pixels: self.caption_pixels(np.stack(pixels)))  # fmt: skip

    def predict(self, images: Iterable) -> list[Prediction]:
        """Caption every image; unreadable ones get an error instead of stopping the rest."""
        return list(self.iter_predict(images))

    def caption(self, images) -> list[str]:
        """Captions for one image or a list of them.

        Raises:
            CaptionerError: Naming the first image that could not be read.
        """
        if isinstance(images, (str, Path, Image.Image, bytes)):
            images = [images]
        return captions_or_error(self.predict(images))

    def describe(
        self, images: Sequence[Image.Image | np.ndarray], beams: int = 0, attention: bool = False
    ) -> list[dict]:
        """What the server returns for decoded images (or their `pixels_from_bytes` arrays): caption, score and,
        with `beams`, the ranked beams (attention maps need the checkpoint: None here)."""
        features = self.features(np.stack([self._pixels(image) if isinstance(image, Image.Image) else image
                                           for image in images]))  # fmt: skip
        (tokens, scores, _), ranked = self.beams(features, self.beam_size)
        rows = []
        for index, (caption, score) in enumerate(zip(self.vocabulary.decode_batch(tokens), scores.tolist())):
            row = {"caption": caption, "score": score, "attention": None}
            if beams:
                if ranked is None:
                    row["beams"] = [{"caption": caption, "score": score}]
                else:
                    texts, values = self.vocabulary.decode_batch(ranked[0][index]), ranked[1][index].tolist()
                    row["beams"] = [{"caption": t, "score": v} for t, v in zip(texts, values)][:beams]
            rows.append(row)
        return rows
