"""GPU paths for real: skipped without CUDA (CI has none); run with `pytest -m gpu` on a GPU machine.

Each test also runs the path's CPU-side reproduction's subject on the device:
the default configs train under the precision `fit` picks, nvJPEG extraction
matches PIL extraction on real photographs, the encoder compiles.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from captioner import Captioner
from captioner.cli import main
from captioner.encoders.torchvision_models import TorchvisionEncoder
from captioner.features.cache import extract_cache
from captioner.features.keys import FeatureSpec
from captioner.runs import run_dir
from tests.conftest import TESTS, last_checkpoint
from tests.test_preprocessing import _bad_files, centred_cosine, photographs  # noqa: F401 (fixture)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
ROOT = TESTS.parent
SMALL = [
    "--model.encoder.weights",
    "null",
    "--model.encoder.model",
    "resnet18",
    "--model.encoder.image_size",
    "64",
    "--data.splits.val_size",
    "20",
    "--data.splits.test_size",
    "20",
    "--data.captions.min_word_count",
    "1",
    "--data.loading.num_workers",
    "2",
    "--trainer.enable_progress_bar",
    "false",
]


def config_args(subcommand, configs, scenes, tmp_path, *extra):
    args = [subcommand]
    for config in configs:
        args += ["--config", str(ROOT / "configs" / config)]
    # CSV logs: the GPU machine has no wandb (tracking is not what these tests prove).
    return [
        *args,
        "--data.data_dir",
        str(scenes),
        "--data.work_dir",
        str(tmp_path / "work"),
        "--trainer.logger",
        "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "runs"),
        *SMALL,
        *extra,
    ]


@pytest.mark.parametrize(
    "configs",
    [["default.yaml"], ["default.yaml", "decoders/attention.yaml"], ["default.yaml", "decoders/transformer.yaml"]],
    ids=lambda c: c[-1],
)
def test_default_configs_train_two_steps_then_test_and_predict_on_the_gpu(configs, scenes, tmp_path):
    cli = main(
        config_args("fit", configs, scenes, tmp_path, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1")
    )
    assert cli.trainer.global_step == 2 and cli.trainer.strategy.root_device.type == "cuda"
    assert cli.trainer.precision in ("bf16-mixed", "16-mixed")  # chosen for the GPU, clipping accepted
    resident = cli.datamodule.store.resident  # the cached features held on the device, batches gathered there
    assert resident is not None and resident.table.device.type == "cuda"
    checkpoint = last_checkpoint(cli.trainer)
    tested = main(config_args("test", configs, scenes, tmp_path, "--ckpt_path", checkpoint))
    assert (run_dir(tested.trainer) / "test_metrics.json").is_file()
    photos = tmp_path / "photos"
    photos.mkdir()
    for image in sorted((scenes / "Images").iterdir())[:5]:
        (photos / image.name).write_bytes(image.read_bytes())
    predicted = main(
        config_args("predict", configs, scenes, tmp_path, "--ckpt_path", checkpoint, "--data.predict_dir", str(photos))
    )
    rows = (run_dir(predicted.trainer) / "predictions.jsonl").read_text().splitlines()
    assert len(rows) == 5 and all(json.loads(row)["caption"] for row in rows)
    assert Captioner.from_checkpoint(checkpoint).caption(sorted(photos.iterdir())[0])[0]


def test_self_critical_stage_on_the_gpu(scenes, tmp_path):
    cli = main(
        config_args(
            "fit", ["default.yaml"], scenes, tmp_path, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1"
        )
    )
    start = last_checkpoint(cli.trainer)
    scst = main(
        config_args(
            "fit",
            ["default.yaml", "objectives/scst.yaml"],
            scenes,
            tmp_path / "scst",
            "--model.init_checkpoint",
            start,
            "--trainer.max_steps",
            "2",
            "--trainer.limit_val_batches",
            "1",
        )
    )
    assert scst.trainer.global_step == 2 and "train/reward_cider" in scst.trainer.logged_metrics


def _extract_with_pil_and_nvjpeg(folder, names, backbone, tmp_path, batch_size, num_workers) -> dict:
    """The feature caches of `names` at 224 px from the CPU path (PIL) and the GPU path (nvJPEG), by path name."""
    spec = FeatureSpec(TorchvisionEncoder(backbone, None, 224))
    caches = {}
    for path_name, device, device_decode in (("pil", "cpu", False), ("nvjpeg", "cuda", True)):
        key = f"{path_name}-key"
        caches[path_name] = extract_cache(
            tmp_path / path_name,
            key,
            folder,
            names,
            spec,
            device,
            batch_size,
            threads=max(1, num_workers),
            device_decode=device_decode,
        )
    return caches


def test_nvjpeg_extraction_matches_pil_extraction_on_real_photographs(photographs, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2_000_000)  # bomb.jpg (9 Mpx) is over twice the limit
    (tmp_path / "bad").mkdir()
    expected = _bad_files(tmp_path / "bad", photographs[0])
    folder = tmp_path / "all"
    folder.mkdir()
    for path in [*photographs, *(tmp_path / "bad").iterdir()]:
        (folder / path.name).write_bytes(path.read_bytes())
    names = sorted(p.name for p in folder.iterdir())
    caches = _extract_with_pil_and_nvjpeg(folder, names, "resnet50", tmp_path, batch_size=8, num_workers=2)
    bad = {name for name, ok in expected.items() if not ok}
    assert set(caches["pil"].failed) == set(caches["nvjpeg"].failed) == bad, {k: c.failed for k, c in caches.items()}
    rows = [i for i, name in enumerate(names) if name not in bad]
    a, b = (torch.from_numpy(np.asarray(c.features[rows], dtype=np.float32)) for c in caches.values())
    similarity = centred_cosine(a, b, a.mean(dim=0))  # bf16 on the GPU, fp32 on the CPU: close, not equal
    assert similarity.min() >= 0.99, similarity


def test_a_large_photograph_under_the_pixel_limit_decodes_on_the_device_as_with_pil(photographs, tmp_path):  # noqa: F811
    """Phone photographs are 12 Mpx: nvJPEG must take them (or hand them to PIL), never fail them."""
    folder = tmp_path / "large"
    folder.mkdir()
    Image.open(photographs[0]).convert("RGB").resize((4000, 3000)).save(folder / "large.jpg", quality=90)
    Image.new("RGB", (3000, 3000), "white").save(folder / "white.jpg")
    names = ["large.jpg", "white.jpg"]
    caches = _extract_with_pil_and_nvjpeg(folder, names, "resnet18", tmp_path, batch_size=2, num_workers=0)
    assert not caches["pil"].failed and not caches["nvjpeg"].failed, {k: c.failed for k, c in caches.items()}


def test_compiled_encoder_extracts_what_the_eager_one_does(scenes, tmp_path):
    names = sorted(p.name for p in (scenes / "Images").iterdir())[:32]
    spec = FeatureSpec(TorchvisionEncoder("resnet18", None, 64))
    results = []
    for compile_encoder in (False, True):
        key = f"compiled-{compile_encoder}"
        cache = extract_cache(
            tmp_path / key, key, scenes / "Images", names, spec, "cuda", batch_size=16, compile_encoder=compile_encoder
        )
        results.append(np.asarray(cache.features, dtype=np.float32))
    np.testing.assert_allclose(results[0], results[1], atol=5e-2, rtol=5e-2)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpu_ddp_fit(scenes, tmp_path):
    args = config_args(
        "fit",
        ["default.yaml"],
        scenes,
        tmp_path,
        "--trainer.max_steps",
        "4",
        "--trainer.limit_val_batches",
        "2",
        "--trainer.strategy",
        "ddp",
        "--trainer.devices",
        "2",
    )
    result = subprocess.run(
        [sys.executable, "-m", "captioner", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "PATH": "/usr/bin:/bin"},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert list((tmp_path / "runs").rglob("last.ckpt"))


def test_pil_images_and_gpu_tensors_mix_in_one_call(scenes, tmp_path):
    """A file, the same picture opened with PIL and on the GPU as a tensor: the same pixels and features (another
    picture's differ), and one call captions them all."""
    from captioner.encoders.image_files import load_any_image

    cli = main(
        config_args(
            "fit", ["default.yaml"], scenes, tmp_path, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "1"
        )
    )
    captioner = Captioner.from_checkpoint(last_checkpoint(cli.trainer))
    path, other = sorted((scenes / "Images").iterdir())[:2]
    on_gpu = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"))).permute(2, 0, 1).cuda()
    sources = [path, Image.open(path), on_gpu, other]
    pixels = torch.stack([load_any_image(source, captioner.preprocessing) for source in sources])
    assert torch.equal(pixels[0], pixels[1]) and (pixels[0].int() - pixels[2].int()).abs().max() <= 1
    with torch.no_grad():
        features = captioner.model.encode_images(pixels).float().flatten(1)
    centre = features.mean(dim=0)
    assert centred_cosine(features[0], features[2], centre) > 0.99  # the same picture, however it came
    assert centred_cosine(features[0], features[3], centre) < 0.9  # another picture
    captions = captioner.caption(sources)
    assert len(captions) == 4 and captions[0] == captioner.caption(path)[0]


def seeded_decoder(kind: str) -> tuple:
    """A seeded random decoder of `kind` over 500 words, on the CPU, with 37 images' features it reads (pooled for
    the LSTM, a 3 x 3 grid for the others): `(vocabulary, decoder, features)`."""
    from captioner.models.decoders import AttentionDecoder, LSTMDecoder, TransformerDecoder
    from captioner.text.words import Vocabulary

    torch.manual_seed(0)
    vocabulary = Vocabulary([f"w{i}" for i in range(500)], max_length=20)
    build = {
        "lstm": lambda: LSTMDecoder(len(vocabulary), 64, embed_dim=32, hidden_dim=64, dropout=0.0),
        "attention": lambda: AttentionDecoder(len(vocabulary), 64, embed_dim=32, hidden_dim=64, attention_dim=32),
        "transformer": lambda: TransformerDecoder(len(vocabulary), 64, width=64, layers=2, heads=4),
    }[kind]
    model = build().eval()
    features = torch.randn(37, 64) if kind == "lstm" else torch.randn(37, 9, 64)
    return vocabulary, model, features


@pytest.mark.parametrize("decoder", ["lstm", "attention", "transformer"])
def test_a_compiled_search_with_cuda_graphs_gives_the_eager_captions(decoder):
    from captioner.decoding import DecodingConfig, SpecialTokens
    from captioner.models.stepping import decode_with

    vocabulary, model, features = seeded_decoder(decoder)
    model, features = model.cuda(), features.cuda()
    special = SpecialTokens.of(vocabulary)
    for config in (DecodingConfig(num_beams=1), DecodingConfig(num_beams=3, num_return=3)):
        eager = decode_with(model, features, config, special, 20)
        for _ in range(2):  # the second run replays the captured graphs
            compiled = decode_with(model, features, config, special, 20, compiled=True)
            assert torch.equal(eager.tokens, compiled.tokens), (decoder, config)
            torch.testing.assert_close(eager.scores, compiled.scores, atol=1e-3, rtol=1e-3)


TINY_GPT2 = {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 64}
PREFIX = [
    "--model.decoder",
    "captioner.models.decoders.PrefixLMDecoder",
    "--model.decoder.lm",
    "null",
    "--model.decoder.lm_config",
    json.dumps(TINY_GPT2),
    "--model.decoder.prefix_length",
    "4",
    "--data.tokenizer",
    "captioner.text.Bpe",
    "--data.tokenizer.vocab_size",
    "300",
]


@pytest.mark.parametrize(
    "extra",
    [
        [
            "--model.trainable_encoder_blocks",
            "all",
            "--model.encoder_lr",
            "0.0003",
            "--model.objective.per_image",
            "true",
        ],
        [*PREFIX, "--model.decoder.train_lm", "true"],
        [*PREFIX, "--model.decoder.train_lm", "lora", "--model.decoder.lora_rank", "4"],
    ],
    ids=["encoder-fine-tuned", "prefix-lm", "prefix-lm-lora"],
)
def test_fine_tuning_and_prefix_lm_steps_train_in_bf16_on_the_gpu(extra, scenes, tmp_path):
    """Steps of the paths CPU tests run in fp32: the encoder fine-tuned from images, the prefix LM trained, and
    LoRA adapters on it; each moves its weights under the GPU's mixed precision, and its checkpoint captions."""
    cli = main(
        config_args(
            "fit",
            ["default.yaml"],
            scenes,
            tmp_path,
            "--trainer.max_steps",
            "3",
            "--trainer.limit_val_batches",
            "1",
            *extra,
        )
    )
    assert cli.trainer.global_step == 3 and cli.trainer.precision in ("bf16-mixed", "16-mixed")
    weights = {name: value for name, value in cli.model.state_dict().items() if value.is_floating_point()}
    assert all(torch.isfinite(value).all() for value in weights.values())
    captioner = Captioner.from_checkpoint(last_checkpoint(cli.trainer))
    assert captioner.caption(sorted((scenes / "Images").iterdir())[0])[0]


def sampled_on(device: str, decoder_kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded top-p sampling of a seeded random decoder over 37 images on `device`: the tokens and their scores."""
    from captioner.decoding import DecodingConfig, SpecialTokens
    from captioner.models.stepping import decode_with

    vocabulary, model, features = seeded_decoder(decoder_kind)
    config = DecodingConfig(num_beams=1, do_sample=True, seed=7, top_p=0.8, temperature=0.9)
    decoded = decode_with(model.to(device), features.to(device), config, SpecialTokens.of(vocabulary), 20)
    return decoded.tokens.cpu(), decoded.scores.cpu()


@pytest.mark.parametrize("decoder", ["lstm", "transformer"])
def test_a_seeded_sample_on_the_gpu_is_the_cpus(decoder, monkeypatch):
    """Each image's random stream is drawn on the host, so the device changes only the model's float rounding: in
    fp32 (TF32 off, which would round the GPU's products to 10 bits) the GPU samples the CPU's captions."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    on_cpu, on_gpu = sampled_on("cpu", decoder), sampled_on("cuda", decoder)
    assert len({tuple(row.flatten().tolist()) for row in on_cpu[0]}) > 30  # sampled: the captions differ
    assert torch.equal(on_cpu[0], on_gpu[0])
    torch.testing.assert_close(on_cpu[1], on_gpu[1], atol=1e-3, rtol=1e-4)
