"""A class path read from a file (checkpoint, export manifest) is imported only when it is captioner's own or in a
module the user allowed; the exported runtime reads only captioner's own tokenizers."""

import json
import sys
from pathlib import Path

import pytest
import torch

from captioner import Captioner
from captioner.cli import main
from captioner.core.errors import CaptionerError
from captioner.export.onnx import export_onnx
from captioner.inference import OnnxCaptioner
from captioner.models.module import CaptionModel

FOREIGN = """
from pathlib import Path
Path({marker!r}).write_text("imported")  # what running a stranger's module could do


class Tokenizer:
    @classmethod
    def from_dict(cls, payload, source):
        return cls()
"""


@pytest.fixture
def foreign_module(tmp_path, monkeypatch):
    """An importable module that leaves a mark when it is imported."""
    marker = tmp_path / "imported.txt"
    (tmp_path / "foreign_parts.py").write_text(FOREIGN.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield marker
    sys.modules.pop("foreign_parts", None)


def test_a_checkpoint_naming_a_foreign_class_is_refused_without_importing_it(
    trained, tmp_path, foreign_module, monkeypatch, capsys
):
    checkpoint = torch.load(trained[0], weights_only=True)
    checkpoint["captioner"]["decoder"]["class_path"] = "foreign_parts.Decoder"
    tampered = tmp_path / "tampered.ckpt"
    torch.save(checkpoint, tampered)
    with pytest.raises(CaptionerError, match=r"'foreign_parts\.Decoder'.*--allow_module foreign_parts"):
        Captioner.from_checkpoint(tampered, device="cpu")
    with pytest.raises(SystemExit):
        main(["caption", str(tampered), "--ckpt_path", str(tampered)])
    assert "is not part of captioner" in capsys.readouterr().err
    assert not foreign_module.exists()  # refused before anything was imported
    # Allowed, it is imported (and fails as the class it is: not a decoder), leaving its mark.
    monkeypatch.setenv("CAPTIONER_ALLOW_MODULES", "foreign_parts")
    with pytest.raises(CaptionerError, match="cannot be imported|is not a CaptionDecoder"):
        Captioner.from_checkpoint(tampered, device="cpu")
    assert foreign_module.exists()


def test_an_exported_folder_naming_a_foreign_tokenizer_is_refused_even_when_allowed(
    trained, tmp_path, foreign_module, monkeypatch
):
    folder = export_onnx(CaptionModel.from_checkpoint(str(trained[0])), tmp_path / "exported")
    OnnxCaptioner(folder)  # as exported: fine
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["vocabulary"]["class_path"] = "foreign_parts.Tokenizer"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setenv("CAPTIONER_ALLOW_MODULES", "foreign_parts")
    with pytest.raises(CaptionerError, match=r"'foreign_parts\.Tokenizer'.*only captioner's own classes"):
        OnnxCaptioner(folder)
    assert not foreign_module.exists()


class Pickled:
    """An object a file may hold: unpickling it would run code of the file's choosing."""


@pytest.mark.parametrize("content", ["readme", "random", "empty", "object"])
def test_a_file_that_is_not_a_checkpoint_is_refused_in_one_message_without_unsafe_advice(content, tmp_path, capsys):
    path = tmp_path / "model.ckpt"
    if content == "object":
        torch.save({"state_dict": {}, "thing": Pickled()}, path)
    else:
        path.write_bytes({"readme": b"# My captioner\n", "random": bytes(range(256)) * 4, "empty": b""}[content])
    with pytest.raises(SystemExit) as exit_info:
        main(["caption", str(tmp_path), "--ckpt_path", str(path), "--device", "cpu"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.startswith(
        f"error: Checkpoint {path} is empty" if content == "empty" else f"error: {path} is not a captioner checkpoint"
    )
    assert "weights_only` set to `False`" not in error and "Traceback" not in error  # torch's advice to unpickle
    assert len(error.strip().splitlines()) == 1
    if content == "object":
        assert "Pickled" in error  # what it refused


class RunsCode:
    """Unpickling this writes a marker file: what a hostile checkpoint would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


COMMANDS_THAT_LOAD_A_MODEL = {
    "serve": ["serve", "--port", "1"],
    "caption-set": ["caption-set", "--input", "{photos}", "--output", "{out}"],
    "test": ["test", "--config", "{tiny}"],
    "validate": ["validate", "--config", "{tiny}"],
    "predict": ["predict", "--config", "{tiny}", "--data.predict_dir", "{photos}"],
    "fit": ["fit", "--config", "{tiny}"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS_THAT_LOAD_A_MODEL))
def test_every_command_refuses_a_file_that_would_run_code_in_one_line_before_it_starts(command, tmp_path, capsys):
    """A pickle that would run code given to `serve`, `caption-set`, `test`, `validate`, `predict` or `fit
    --ckpt_path`: the one line `caption` prints, exit 2, before any server, job or run starts, and no code ran."""
    from tests.conftest import TINY_CONFIG

    marker = tmp_path / "the code ran"
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}, "payload": RunsCode(str(marker))}, path)
    (tmp_path / "photos").mkdir()
    filled = {"photos": str(tmp_path / "photos"), "out": str(tmp_path / "out"), "tiny": str(TINY_CONFIG)}
    argv = [part.format(**filled) for part in COMMANDS_THAT_LOAD_A_MODEL[command]]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--ckpt_path", str(path)])
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and not marker.exists()
    assert error.startswith(f"error: {path} is not a captioner checkpoint") and len(error.splitlines()) == 1, error
    assert "io.open was not an allowed global" in error and "weights_only" not in error  # what it refused
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("**/lightning_logs"))  # nothing started


PARTS = {
    "encoder": ("encoder", "class_path"),
    "decoder": ("decoder", "class_path"),
    "tokenizer": ("vocabulary", "class_path"),
}


def tampered(entry: dict, part: str) -> dict:
    """A `captioner` entry with one part's class path naming the foreign module."""
    key, field = PARTS[part]
    return {**entry, key: {**entry[key], field: f"foreign_parts.{part.title()}"}}


@pytest.mark.parametrize("part", sorted(PARTS))
def test_each_class_path_of_a_checkpoint_is_refused_without_importing_it(part, trained, tmp_path, foreign_module):
    checkpoint = torch.load(trained[0], weights_only=True)
    checkpoint["captioner"] = tampered(checkpoint["captioner"], part)
    path = tmp_path / "tampered.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(CaptionerError, match=rf"the {part} class 'foreign_parts\.{part.title()}'.*not part of"):
        Captioner.from_checkpoint(path, device="cpu")
    from captioner.inference.loading import check_model

    with pytest.raises(CaptionerError, match=rf"foreign_parts\.{part.title()}"):
        check_model(path)  # what serve, caption-set and the Lightning commands check before they start
    assert not foreign_module.exists()


@pytest.fixture(scope="module")
def published(trained, tmp_path_factory):
    from captioner.publish import publish

    return publish(trained[0], tmp_path_factory.mktemp("published") / "model")


@pytest.mark.parametrize("part", sorted(PARTS))
def test_each_class_path_of_a_published_config_is_refused_without_importing_it(
    part, published, tmp_path, foreign_module
):
    import shutil

    copy = Path(shutil.copytree(published, tmp_path / "copy"))
    config = json.loads((copy / "config.json").read_text())
    config["captioner"] = tampered(config["captioner"], part)
    (copy / "config.json").write_text(json.dumps(config))
    Captioner.from_pretrained(published, device="cpu")  # as published: fine
    with pytest.raises(CaptionerError, match=rf"the {part} class 'foreign_parts\.{part.title()}'.*not part of"):
        Captioner.from_pretrained(copy, device="cpu")
    assert not foreign_module.exists()


@pytest.mark.parametrize("part", ["encoder", "decoder"])
def test_an_exports_part_class_paths_describe_it_and_are_never_imported(part, trained, tmp_path, foreign_module):
    """The exported runtime runs graphs: the manifest's encoder and decoder class paths only describe them (a
    decoder of your own exports and runs without its module), so naming a foreign module imports nothing."""
    folder = export_onnx(CaptionModel.from_checkpoint(str(trained[0])), tmp_path / "exported")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest[part]["class_path"] = f"foreign_parts.{part.title()}"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    runtime = OnnxCaptioner(folder)
    assert runtime.limits.decoder == ("Decoder" if part == "decoder" else "LSTMDecoder")
    assert not foreign_module.exists()


def test_an_objective_a_run_config_names_is_never_imported_when_a_checkpoint_is_published(
    trained, tmp_path, foreign_module
):
    """Objectives are never read from a file to be imported: `publish` reads the run's config for the card only."""
    import shutil

    from captioner.publish import publish

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    checkpoint = Path(shutil.copy(trained[0], run / "checkpoints" / "best.ckpt"))
    (run / "config.yaml").write_text("model:\n  objective:\n    class_path: foreign_parts.Objective\n")
    folder = publish(checkpoint, tmp_path / "published")
    assert "Objective" in (folder / "README.md").read_text() and not foreign_module.exists()
