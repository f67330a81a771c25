"""ONNX export and the torch-free runtime: same captions as PyTorch, checked folders, no torch imported."""

import functools
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from captioner import Captioner
from captioner.cli import main
from captioner.core.errors import CaptionerError
from captioner.decoding.confidence import Calibrator
from captioner.encoders.torchvision_models import TorchvisionEncoder
from captioner.export.onnx import export_onnx
from captioner.inference import OnnxCaptioner
from captioner.models.decoders import AttentionDecoder, LSTMDecoder, PrefixLMDecoder, TransformerDecoder
from captioner.models.module import CaptionModel
from captioner.text import Bpe, Vocabulary
from tests.conftest import TESTS, copy_scenes
from tests.plugins import GRUDecoder

ROOT = TESTS.parent
DECODERS = {
    "lstm": functools.partial(LSTMDecoder, embed_dim=16, hidden_dim=24, num_layers=2, dropout=0.0),
    "attention": functools.partial(AttentionDecoder, embed_dim=16, hidden_dim=24, attention_dim=12, dropout=0.0),
    "transformer": functools.partial(TransformerDecoder, width=16, layers=2, heads=2, dropout=0.0),
    # A small random GPT-2 behind an MLP prefix, writing BPE pieces: the LM's cache is the exported state.
    "prefix-lm": functools.partial(
        PrefixLMDecoder,
        lm=None,
        prefix_length=3,
        lm_config={"model_type": "gpt2", "n_layer": 2, "n_embd": 16, "n_head": 2},
    ),
}


def untrained(kind: str, scenes) -> CaptionModel:
    """A model with random weights over the scenes' words: parity does not need a trained one."""
    torch.manual_seed(0)
    payload = json.loads((scenes / "captions.json").read_text())
    captions = [a["caption"] for a in payload["annotations"]]
    if kind == "prefix-lm":
        vocabulary = Bpe(vocab_size=300, max_tokens=12).build(captions, max_length=12)
    else:
        vocabulary = Vocabulary.build(captions, min_count=1, max_length=12)
    model = CaptionModel(DECODERS[kind], encoder=TorchvisionEncoder("resnet18", None, 64))
    model.build(vocabulary)
    with torch.no_grad():
        if kind == "prefix-lm":  # a random prefix barely depends on the image: standardise features as training would
            pixels = torch.stack([model.preprocessing.from_file(p) for p in sorted((scenes / "Images").iterdir())[:40]])
            features = model.encode_images(pixels)
            model.decoder.feature_norm.running_mean.copy_(features.mean(0))
            model.decoder.feature_norm.running_var.copy_(features.var(0))
            model.decoder.lm.get_output_embeddings().weight.mul_(4)
            model.decoder.mapper.net[0].weight.mul_(3)
        else:
            model.decoder.head.weight.mul_(4)  # peaked, varied distributions: captions that differ between images
        if kind == "transformer":
            model.decoder.project_regions.weight.mul_(20)  # a random Transformer barely looks at the image
    return model.eval()


@pytest.mark.parametrize("kind", list(DECODERS))
def test_onnx_runtime_captions_equal_pytorchs_for_every_decoder(kind, scenes_source, tmp_path):
    model = untrained(kind, scenes_source)
    model.confidence.calibrator = Calibrator((-1.0, -3.0, 8.0), (0.5, 1.0, 3.0), (1.5, 0.7, -0.2), 0.1, 100.0, 50)
    folder = export_onnx(model, tmp_path / "onnx")
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "decoder_prepare.onnx",
        "decoder_step.onnx",
        "encoder.onnx",
        "manifest.json",
    ]
    images = sorted((scenes_source / "Images").iterdir())[:40]
    runtime, reference = OnnxCaptioner(folder), Captioner(model, batch_size=16)
    pixels = torch.stack([model.preprocessing.from_file(p) for p in images])
    sampled = {"num_beams": 1, "do_sample": True, "temperature": 0.9, "top_p": 0.8, "seed": 7}
    constrained = {"num_beams": 3, "force_words": ["triangle", ["red", "blue"]], "bad_words": ["small circle"]}
    for settings in ({"num_beams": 1}, {"num_beams": 5, "length_penalty": 0.6}, sampled, constrained):
        # End to end (each side decoding and resizing the files itself): the same captions.
        ours, theirs = runtime.predict(images, **settings), reference.predict(images, **settings)
        assert np.mean([a.caption == b.caption for a, b in zip(ours, theirs)]) >= 0.99, (kind, settings)
        if settings is constrained:  # every caption holds the words, the PyTorch and the exported alike
            assert all("triangle" in b.caption and {"red", "blue"} & set(b.caption.split()) for b in theirs)
        else:
            assert len({b.caption for b in theirs}) > 3  # captions that differ between images, not one for all
        # The graphs and the search alone, on the same pixels: the same captions and log-probabilities.
        answers = runtime.describe_pixels(pixels.numpy(), runtime.settings(**settings))
        captions, scores = [a["caption"] for a in answers], [a["score"] for a in answers]
        expected, expected_scores = reference.caption_tensor(pixels, **settings)
        assert captions == expected, (kind, settings)
        assert np.abs(np.array(scores) - np.array(expected_scores)).max() < 1e-3, (kind, settings)
    with torch.no_grad():
        features = model.encode_images(pixels[:8]).numpy()
    np.testing.assert_allclose(runtime.features(pixels[:8].numpy()), features, atol=1e-4, rtol=1e-4)
    # What the server returns: the same caption and the same ranked alternatives.
    pictures = [Image.open(path) for path in images[:4]]
    for ours, theirs in zip(runtime.describe(pictures, num_return=3), reference.describe(pictures, num_return=3)):
        assert ours["caption"] == theirs["caption"] and len(ours["alternatives"]) == 3
        assert [a["caption"] for a in ours["alternatives"]] == [a["caption"] for a in theirs["alternatives"]]
        assert ours["attention"] is None  # attention maps need the checkpoint
        assert 0 <= theirs["confidence"] <= 1 and ours["confidence"] == pytest.approx(theirs["confidence"], abs=1e-3)
    if kind == "prefix-lm":  # the BPE tokenizer travels in the manifest and decodes without torch
        captions, imported = captions_without_torch(folder, images[:6])
        assert captions == [p.caption for p in reference.predict(images[:6])] and imported == "[]"


def captions_without_torch(folder, images) -> tuple[list[str], str]:
    """Captions of the exported runtime in a process where torch and Lightning cannot be imported, and the torch or
    Lightning modules it ended up with."""
    code = (
        "import json, sys\n"
        "for name in ('torch', 'torchvision', 'lightning', 'pytorch_lightning', 'torchmetrics'):\n"
        "    sys.modules[name] = None  # importing any of them now fails\n"
        "from captioner.inference import OnnxCaptioner\n"
        f"captioner = OnnxCaptioner({str(folder)!r})\n"
        f"print(json.dumps([p.caption for p in captioner.predict({[str(i) for i in images]!r})]))\n"
        "loaded = [n for n, m in sys.modules.items() if m is not None and n.split('.')[0] in ('torch', 'lightning')]\n"
        "print(sorted(loaded))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    captions, imported = result.stdout.strip().splitlines()
    return json.loads(captions), imported


def test_the_runtime_imports_and_captions_without_torch(trained, scenes_source, tmp_path):
    checkpoint, _ = trained
    main(["export", "--ckpt_path", str(checkpoint), "--output", str(tmp_path / "onnx")])
    image = sorted((scenes_source / "Images").iterdir())[0]
    captions, imported = captions_without_torch(tmp_path / "onnx", [image])
    assert captions[0] == Captioner.from_checkpoint(checkpoint, device="cpu").caption(image)[0]
    assert imported == "[]"


def test_caption_command_takes_an_exported_folder(trained, scenes_source, tmp_path, capsys):
    checkpoint, _ = trained
    main(["export", "--ckpt_path", str(checkpoint), "--output", str(tmp_path / "onnx"), "--quantize", "int8"])
    manifest = json.loads((tmp_path / "onnx" / "manifest.json").read_text())
    assert manifest["quantized"] == {"int8": True, "encoder": False}
    image = sorted((scenes_source / "Images").iterdir())[0]
    (tmp_path / "bad.jpg").write_text("not a picture")
    with pytest.raises(SystemExit) as exit_info:
        main(["caption", str(image), str(tmp_path / "bad.jpg"), "--ckpt_path", str(tmp_path / "onnx")])
    out = capsys.readouterr()
    lines = out.out.splitlines()[1:]  # after the export's own line
    assert exit_info.value.code == 1 and lines[0].startswith(f"{image}: ") and "bad.jpg: ERROR not an image" in lines[1]
    # A real picture in a format outside the accepted list is a per-file error, by the torch and ONNX paths alike.
    Image.open(image).save(tmp_path / "scene.tiff")
    for model in (str(checkpoint), str(tmp_path / "onnx")):
        with pytest.raises(SystemExit):
            main(["caption", str(image), str(tmp_path / "scene.tiff"), "--ckpt_path", model])
        tiff = capsys.readouterr().out.splitlines()[-1]
        assert (
            tiff == f"{tmp_path / 'scene.tiff'}: ERROR not an image in an accepted format (JPEG, PNG, BMP, WebP, GIF)"
        )


def test_a_folder_is_checked_when_loaded(trained, tmp_path):
    checkpoint, _ = trained
    folder = export_onnx(CaptionModel.from_checkpoint(str(checkpoint)), tmp_path / "onnx")
    data = bytearray((folder / "decoder_step.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "decoder_step.onnx").write_bytes(bytes(data))
    with pytest.raises(CaptionerError, match=r"decoder_step.onnx was altered"):
        OnnxCaptioner(folder)
    (folder / "decoder_step.onnx").unlink()
    with pytest.raises(CaptionerError, match="lacks decoder_step.onnx"):
        OnnxCaptioner(folder)
    (folder / "manifest.json").unlink()
    with pytest.raises(CaptionerError, match="has no manifest.json"):
        OnnxCaptioner(folder)
    with pytest.raises(CaptionerError, match="already holds files"):
        export_onnx(CaptionModel.from_checkpoint(str(checkpoint)), folder)


def test_every_graph_is_listed_with_its_digest_and_nothing_leaves_the_folder(trained, tmp_path):
    """The folder is checked as a whole: an extra graph, a graph named without a digest, a path out of the folder."""
    checkpoint, _ = trained
    folder = export_onnx(CaptionModel.from_checkpoint(str(checkpoint)), tmp_path / "onnx")
    manifest = json.loads((folder / "manifest.json").read_text())
    OnnxCaptioner(folder)  # as exported: accepted
    shutil.copy(folder / "encoder.onnx", folder / "encoder_v2.onnx")  # dropped in by someone else
    with pytest.raises(CaptionerError, match="holds encoder_v2.onnx, which its manifest does not list"):
        OnnxCaptioner(folder)
    for graphs, files, says in (
        (
            {**manifest["graphs"], "encoder": "encoder_v2.onnx"},
            manifest["files"],
            "encoder graph encoder_v2.onnx is not listed with a digest",
        ),
        ({**manifest["graphs"], "step": "../elsewhere/decoder_step.onnx"}, manifest["files"], "not a file inside"),
        (manifest["graphs"], {**manifest["files"], "/etc/passwd": "0" * 64}, "not a file inside"),
    ):
        (folder / "manifest.json").write_text(json.dumps({**manifest, "graphs": graphs, "files": files}))
        with pytest.raises(CaptionerError, match=says):
            OnnxCaptioner(folder)


class NestedStateDecoder(GRUDecoder):
    """A decoder whose state is a dict: fine for search in PyTorch, not a flat list of tensors for ONNX."""

    def initial_state(self, context):
        return {"hidden": context}

    def step(self, tokens, state, context):
        logits, hidden = super().step(tokens, state["hidden"], context)
        return logits, {"hidden": hidden}


def test_a_model_that_cannot_be_exported_says_why(scenes_source, tmp_path):
    model = CaptionModel(NestedStateDecoder, encoder=TorchvisionEncoder("resnet18", None, 32))
    model.build(Vocabulary(["a", "b"], max_length=4))
    with pytest.raises(CaptionerError, match="state is not a tensor or a flat tuple of tensors"):
        export_onnx(model.eval(), tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists() and not list(tmp_path.glob(".onnx*"))  # nothing half-written left


def test_a_calibrated_static_int8_encoder_keeps_the_features_and_captions(trained, scenes_source, tmp_path):
    checkpoint, _ = trained
    images = sorted((scenes_source / "Images").iterdir())
    calibration = copy_scenes(scenes_source, tmp_path / "samples", 24)
    main(["export", "--ckpt_path", str(checkpoint), "--output", str(tmp_path / "fp32")])
    main(
        [
            "export",
            "--ckpt_path",
            str(checkpoint),
            "--output",
            str(tmp_path / "int8"),
            "--quantize",
            "int8",
            "--quantize_encoder",
            "--calibration_dir",
            str(calibration),
        ]
    )
    manifest = json.loads((tmp_path / "int8" / "manifest.json").read_text())
    assert manifest["quantized"]["encoder"] == {"method": "static (QDQ)", "calibration_images": 24}
    import onnx

    operators = {node.op_type for node in onnx.load(tmp_path / "int8" / "encoder.onnx").graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= operators and "ConvInteger" not in operators  # not dynamic
    fp32, int8 = OnnxCaptioner(tmp_path / "fp32"), OnnxCaptioner(tmp_path / "int8")
    held_out = np.stack([fp32.pixels_from_bytes(path.read_bytes()) for path in images[60:92]])  # not calibrated on
    a, b = fp32.features(held_out), int8.features(held_out)
    centre = a.mean(axis=0)
    cosine = (
        ((a - centre) * (b - centre)).sum(1) / np.linalg.norm(a - centre, axis=1) / np.linalg.norm(b - centre, axis=1)
    )
    assert cosine.mean() > 0.9, cosine
    assert np.mean([x == y for x, y in zip(fp32.caption(images[60:92]), int8.caption(images[60:92]))]) >= 0.5
    with pytest.raises(SystemExit):
        main(
            [
                "export",
                "--ckpt_path",
                str(checkpoint),
                "--output",
                str(tmp_path / "x"),
                "--calibration_dir",
                str(calibration),
            ]
        )  # calibration without quantising the encoder: refused
