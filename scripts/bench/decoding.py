"""Phases: decoding, greedy and beam, with and without the compiled step, and the prefix LM."""

from __future__ import annotations

import time

import numpy as np

from bench.harness import _sync
from bench.training import _model


def ours_decode(
    features_file: str,
    count: int,
    device: str,
    beam_size: int,
    batch_size: int,
    bf16: bool = False,
    decoder: str = "lstm",
    overrides: dict | None = None,
    compiled: bool = False,
) -> dict:
    """Decoding `count` feature rows in batches; `overrides` are DecodingConfig settings (constraints, ...);
    `compiled` steps the decoder through torch.compile (CUDA graphs on a GPU), the first batch compiling."""
    import contextlib

    import torch

    from captioner.core.hardware import CPU_BF16_REQUIREMENT, bf16_autocast_available

    if bf16 and not bf16_autocast_available(device):
        where = "GPU" if device.startswith("cuda") else f"CPU (bf16 needs {CPU_BF16_REQUIREMENT})"
        return {"unsupported": f"not supported on this {where}"}
    from captioner.models import captioning

    model = _model(decoder, beam_size).to(device).eval()
    config = model.decoding.with_overrides(**(overrides or {}))
    features = torch.from_numpy(np.asarray(np.load(features_file, mmap_mode="r")[:count], dtype=np.float32))
    # What `--trainer.precision bf16-mixed` does around test and predict steps.
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with autocast:
        captioning.decode_features(model, features[:batch_size].to(device), config, compiled)  # warm-up (compiles)
        _sync(device)
        started, lengths = time.perf_counter(), []
        for start in range(0, count, batch_size):
            batch = features[start : start + batch_size].to(device, non_blocking=True)
            result = captioning.decode_features(model, batch, config, compiled)
            lengths.append(result.best_lengths)
        _sync(device)
    elapsed = time.perf_counter() - started
    return {"captions_per_s": count / elapsed, "mean_length": float(torch.cat(lengths).float().mean())}


def ours_prefix_decode(features_file: str, count: int, device: str, batch_size: int, words: int, cached: bool) -> dict:
    """Transformer greedy decoding of `words` words, with the key/value cache or recomputing the whole prefix."""
    import torch

    from captioner.decoding import DecodingConfig, SpecialTokens
    from captioner.models.stepping import decode_with

    model = _model("transformer").to(device).eval()
    decoder, special = model.decoder, SpecialTokens.of(model.vocabulary)
    features = torch.from_numpy(np.asarray(np.load(features_file, mmap_mode="r")[:count], dtype=np.float32))

    def decode(batch: torch.Tensor) -> torch.Tensor:
        if cached:
            return decode_with(decoder, batch, DecodingConfig(num_beams=1), special, words - 1).best_tokens
        prefix = torch.full((len(batch), 1), special.start, device=batch.device)
        for _ in range(words):  # the whole prefix through the model at every step
            logits = decoder(batch, prefix).logits[:, -1].float()
            logits[:, list(special.banned)] = float("-inf")
            prefix = torch.cat([prefix, logits.argmax(-1, keepdim=True)], dim=1)
        return prefix[:, 1:]

    with torch.no_grad():
        decode(features[:batch_size].to(device))  # warm-up
        _sync(device)
        started = time.perf_counter()
        for start in range(0, count, batch_size):
            tokens = decode(features[start : start + batch_size].to(device))
        _sync(device)
    return {"captions_per_s": count / (time.perf_counter() - started), "words": int(tokens.shape[1])}


# The prefix decoder over a language model of each family at one size (4 layers, width 256; grouped-query attention,
# 2 key and value heads of 4, for Llama): the exported step's speed per family.
LM_FAMILIES = {
    "gpt2": {"model_type": "gpt2", "n_layer": 4, "n_embd": 256, "n_head": 4, "n_positions": 128},
    "llama": {
        "model_type": "llama",
        "num_hidden_layers": 4,
        "hidden_size": 256,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 1024,
        "max_position_embeddings": 128,
    },
}


def exported_lm_decode(family: str, work: str, count: int, words: int = 20) -> dict:
    """Greedy decoding of `count` images, `words` words each, by the exported prefix decoder over a random LM of
    `family` (ONNX Runtime, NumPy search): captions per second and milliseconds per step."""
    import functools

    import torch

    from captioner.decoding import DecodingConfig
    from captioner.encoders.torchvision_models import TorchvisionEncoder
    from captioner.export.onnx import export_onnx
    from captioner.inference import OnnxCaptioner
    from captioner.models.decoders import PrefixLMDecoder
    from captioner.models.module import CaptionModel
    from captioner.text.words import Vocabulary

    torch.manual_seed(0)
    factory = functools.partial(PrefixLMDecoder, lm=None, lm_config=LM_FAMILIES[family], prefix_length=4)
    model = CaptionModel(
        factory,
        encoder=TorchvisionEncoder("resnet18", None, 32),
        decoding=DecodingConfig(num_beams=1, min_length=words, max_length=words),
    )
    model.build(Vocabulary([f"w{i}" for i in range(1000)], max_length=words))
    runtime = OnnxCaptioner(export_onnx(model.eval(), f"{work}/{family}"), batch_size=count)
    features = np.random.default_rng(0).standard_normal((count, 512)).astype(np.float32)
    runtime.decode_features(features[:4])  # warm-up
    started = time.perf_counter()
    runtime.decode_features(features)
    elapsed = time.perf_counter() - started
    return {"captions_per_s": count / elapsed, "ms_per_step": 1000 * elapsed / (words + 1), "family": family}
