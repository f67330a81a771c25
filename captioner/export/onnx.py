"""Export a checkpoint to a self-describing ONNX folder that `captioner.inference.exported` captions with, torch-free.

    python -m captioner export --ckpt_path best.ckpt --output captioner-onnx/ [--quantize int8]
        [--quantize_encoder --calibration_dir photos/]

The folder holds three graphs with a dynamic batch: the encoder (uint8 images
in, features out, normalisation inside), the decoder's `prepare` (features to
the per-image context and the initial state) and its `step` (previous tokens,
state and context in; the next token's logits and the new state out), so search
runs outside the graphs. The manifest records the vocabulary, the
preprocessing, the decoding settings, how the state and context are laid out,
and each file's SHA-256.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from captioner.core.errors import CaptionerError
from captioner.core.files import atomic_folder
from captioner.core.parts import add_allow_argument, allow_modules
from captioner.encoders.preprocessing import Preprocessing
from captioner.export.quantization import calibration_batches, quantize_dynamic_graph, quantize_static_encoder
from captioner.inference.manifest import MANIFEST, README, ExportManifest, file_digest
from captioner.models import checkpoints
from captioner.models.module import CaptionModel

log = logging.getLogger("captioner")
OPSET = 17
GRAPHS = {"encoder": "encoder.onnx", "prepare": "decoder_prepare.onnx", "step": "decoder_step.onnx"}


def _tensors(tree, what: str) -> list[torch.Tensor]:
    """A context or state as a flat list: one tensor, or a flat tuple of tensors (what export supports)."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, (tuple, list)) and all(isinstance(part, torch.Tensor) for part in tree):
        return list(tree)
    raise CaptionerError(
        f"This decoder's {what} is not a tensor or a flat tuple of tensors, which ONNX export needs: flatten it "
        "in the decoder (see captioner/models/decoders/base.py)."
    )


def _named(decoder: nn.Module) -> str:
    """A decoder's class, and the language model's type behind a prefix decoder."""
    lm = getattr(getattr(decoder, "lm", None), "config", None)
    return type(decoder).__name__ + (f" over a {lm.model_type} language model" if lm is not None else "")


class _Encoder(nn.Module):
    def __init__(self, model: CaptionModel) -> None:
        super().__init__()
        self.encoder, self.grid = model.encoder, model.decoder.features == "grid"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images, grid=self.grid)


class _Prepare(nn.Module):
    def __init__(self, model: CaptionModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor):
        decoder = self.model.decoder
        context = decoder.prepare(self.model.image_features(features))  # zeros for the blind baseline
        return (*_tensors(context, "context"), *_tensors(decoder.initial_state(context), "state"))


class _Step(nn.Module):
    """One decoder step: the logits of the next token (the search applies the decoding rules and normalises, in
    NumPy as in PyTorch) and the new state."""

    def __init__(
        self, model: CaptionModel, states: int, contexts: int, context_is_tensor: bool, state_is_tensor: bool
    ) -> None:
        super().__init__()
        self.decoder, self.states, self.contexts = model.decoder, states, contexts
        self.context_is_tensor, self.state_is_tensor = context_is_tensor, state_is_tensor

    def forward(self, tokens: torch.Tensor, *flat: torch.Tensor):
        state, context = flat[: self.states], flat[self.states :]
        state = state[0] if self.state_is_tensor else tuple(state)
        context = context[0] if self.context_is_tensor else tuple(context)
        logits, new_state = self.decoder.step(tokens, state, context)
        return (logits.float(), *_tensors(new_state, "state"))


@contextlib.contextmanager
def _without_fused_attention() -> Iterator[None]:
    """`nn.MultiheadAttention` (OpenCLIP's towers use it) takes a fused kernel in inference that ONNX cannot export;
    trace the plain path instead (the same arithmetic)."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def export_onnx(
    model: CaptionModel,
    output: str | Path,
    quantize: str | None = None,
    quantize_encoder: bool = False,
    calibration_dir: str | Path | None = None,
    calibration_images: int = 64,
) -> Path:
    """Write `model` as an ONNX folder (see the module docstring); the folder is complete or absent.

    Args:
        model: A model with its vocabulary (from a checkpoint).
        output: The folder to create (must not exist, or be empty).
        quantize: "int8": dynamic int8 quantisation (ONNX Runtime's) of the decoder graphs.
        quantize_encoder: Quantise the encoder too (with `quantize`): static QDQ calibrated on `calibration_dir`,
            else dynamic (see `captioner.export.quantization`).
        calibration_dir: Sample pictures like those the model will caption (searched recursively).
        calibration_images: The most of them used.

    Raises:
        CaptionerError: When the output folder holds anything, or the decoder cannot be exported.
    """
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise CaptionerError(f"--output {output} already holds files: choose a new folder.")
    model = model.cpu().eval()
    decoder = model.require_decoder()
    size = model.preprocessing.image_size
    images = torch.zeros(2, 3, size, size, dtype=torch.uint8)
    with torch.no_grad():
        features = model.encoder(images, grid=decoder.features == "grid")
        context = decoder.prepare(features)
        state = decoder.initial_state(context)
        tokens = torch.full((2,), model.vocabulary.start_index, dtype=torch.long)
        _, state = decoder.step(tokens, state, context)  # one step: caches that grow are not empty when traced
        contexts, states = _tensors(context, "context"), _tensors(state, "state")
        expanded = decoder.expand_context(context, 3)
    context_per_image = all(a.shape[0] == b.shape[0] for a, b in zip(_tensors(expanded, "context"), contexts))
    with atomic_folder(output) as tmp:  # renamed into place when complete
        names_state = [f"state{i}" for i in range(len(states))]
        names_context = [f"context{i}" for i in range(len(contexts))]
        # Every dimension that can vary is dynamic: rows, images, and (for growing caches) time.
        dynamic = {name: {d: f"{name}_d{d}" for d in range(t.dim())} for name, t in zip(names_state, states)}
        dynamic.update({f"new_{n}": {d: f"new_{n}_d{d}" for d in range(t.dim())} for n, t in zip(names_state, states)})
        dynamic.update({name: {d: f"{name}_d{d}" for d in range(t.dim())} for name, t in zip(names_context, contexts)})
        with warnings.catch_warnings(), _without_fused_attention(), decoder.export_mode():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
            torch.onnx.export(
                _Encoder(model).eval(),
                (images,),
                tmp / GRAPHS["encoder"],
                dynamo=False,
                input_names=["images"],
                output_names=["features"],
                opset_version=OPSET,
                dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
            )
            torch.onnx.export(
                _Prepare(model).eval(),
                (features,),
                tmp / GRAPHS["prepare"],
                dynamo=False,
                input_names=["features"],
                output_names=[*names_context, *names_state],
                opset_version=OPSET,
                dynamic_axes={"features": {0: "images"}, **{n: {0: "images"} for n in [*names_context, *names_state]}},
            )
            step = _Step(
                model, len(states), len(contexts), isinstance(context, torch.Tensor), isinstance(state, torch.Tensor)
            ).eval()
            try:
                torch.onnx.export(
                    step,
                    (tokens, *states, *contexts),
                    tmp / GRAPHS["step"],
                    dynamo=False,
                    input_names=["tokens", *names_state, *names_context],
                    output_names=["logits", *[f"new_{n}" for n in names_state]],
                    opset_version=OPSET,
                    dynamic_axes={"tokens": {0: "rows"}, "logits": {0: "rows"}, **dynamic},
                )
            except (RuntimeError, AssertionError, TypeError, ValueError) as error:
                raise CaptionerError(
                    f"{_named(decoder)} cannot be exported to ONNX ({type(error).__name__}: "
                    f"{str(error).splitlines()[0][:200]}). Exported and tested: the LSTM, attention and Transformer "
                    "decoders, and the prefix decoder over GPT-2, OPT, GPT-Neo, GPT-NeoX (Pythia), Llama and Qwen2."
                ) from None
        encoder_quantization: dict | bool = False
        if quantize == "int8":
            for name in ("prepare", "step"):
                quantize_dynamic_graph(tmp / GRAPHS[name])
            if quantize_encoder and calibration_dir is not None:
                batches = calibration_batches(calibration_dir, model.preprocessing, calibration_images)
                encoder_quantization = quantize_static_encoder(tmp / GRAPHS["encoder"], batches)
            elif quantize_encoder:
                log.warning(
                    "--quantize_encoder without --calibration_dir: dynamic quantisation, which runs "
                    "convolutions slower than fp32 on most CPUs; give sample pictures for static."
                )
                quantize_dynamic_graph(tmp / GRAPHS["encoder"])
                encoder_quantization = {"method": "dynamic"}
        elif quantize is not None:
            raise CaptionerError(f"--quantize {quantize!r}: only int8 is supported.")
        meta = checkpoints.meta_of(model)
        manifest = ExportManifest(
            graphs=GRAPHS,
            files={name: file_digest(tmp / name) for name in GRAPHS.values()},
            decoder=meta["decoder"],
            encoder=meta["encoder"],
            encoder_name=model.encoder.name,
            features=decoder.features,
            grid_shape=list(model.encoder.grid_shape) if model.encoder.grid_shape else None,
            preprocessing=meta["preprocessing"],
            vocabulary=meta["vocabulary"],
            decoding=meta["decoding"],
            blind=meta["blind"],
            longest_caption=decoder.longest_caption(),
            confidence=meta.get("confidence"),
            state_count=len(states),
            context_count=len(contexts),
            context_per_image=context_per_image,
            quantized={"int8": quantize == "int8", "encoder": encoder_quantization},
            opset=OPSET,
        )
        (tmp / README).write_text(_readme(manifest), encoding="utf-8")
        manifest.write(tmp)
    return output


def _readme(manifest: ExportManifest) -> str:
    decoder = manifest.decoder["class_path"].rsplit(".", 1)[-1]
    size = manifest.preprocessing["image_size"]
    preprocessing = Preprocessing.from_dict(manifest.preprocessing).describe()
    encoder = manifest.quantized["encoder"]
    quantized = "int8 (dynamic) decoder" + (f", int8 ({encoder['method']}) encoder" if encoder else "")
    return f"""# An exported captioner

A {decoder} over {manifest.encoder_name} features, exported by `python -m captioner export`.
Precision: {quantized if manifest.quantized["int8"] else "fp32"}.

Caption with ONNX Runtime, NumPy and Pillow only (no torch):

    pip install --no-deps captioner onnxruntime numpy pillow
    python -c "from captioner.inference import OnnxCaptioner; print(OnnxCaptioner('.').caption(['photo.jpg']))"

or serve it: `python -m captioner serve --ckpt_path <this folder>`.

Files: `encoder.onnx` (uint8 images `(B, 3, {size}, {size})` to features), `decoder_prepare.onnx` (features to
the context and the initial state), `decoder_step.onnx` (previous tokens, state and context to the next token's logits
and the next state), `manifest.json` (vocabulary, preprocessing, decoding settings, the SHA-256 of each file,
checked on load). Preprocessing: decode the whole image (JPEG, PNG, BMP, WebP or GIF), RGB (transparency on
white), then {preprocessing} (`captioner.core.pixels.preprocess_array`); the encoder graph normalises.
"""


def export_parser() -> argparse.ArgumentParser:
    """The options of `python -m captioner export`."""
    parser = argparse.ArgumentParser(prog="python -m captioner export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint written by fit")
    parser.add_argument("--output", required=True, help="the folder to write (new or empty)")
    parser.add_argument("--quantize", choices=["int8"], default=None, help="dynamic int8 quantisation of the decoder")
    parser.add_argument("--quantize_encoder", action="store_true", help="with --quantize, the encoder too")
    parser.add_argument(
        "--calibration_dir", default=None, help="sample pictures to calibrate the encoder's static int8 quantisation on"
    )
    parser.add_argument("--calibration_images", type=int, default=64, help="the most sample pictures used")
    add_allow_argument(parser)
    return parser


def export_command(argv: list[str]) -> int:
    """`python -m captioner export --ckpt_path CKPT --output FOLDER [--quantize int8] [--quantize_encoder]
    [--calibration_dir FOLDER]`."""
    options = export_parser().parse_args(argv)
    allow_modules(*options.allow_module)
    model = CaptionModel.from_checkpoint(options.ckpt_path)
    if options.calibration_dir and not (options.quantize and options.quantize_encoder):
        raise CaptionerError(
            "--calibration_dir calibrates the encoder's int8 quantisation: add --quantize int8 --quantize_encoder."
        )
    folder = export_onnx(
        model,
        options.output,
        options.quantize,
        options.quantize_encoder,
        options.calibration_dir,
        options.calibration_images,
    )
    print(f"Exported to {folder} ({', '.join(sorted(json.loads((folder / MANIFEST).read_text())['files']))})")
    return 0
