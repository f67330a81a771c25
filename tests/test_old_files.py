"""Files written by captioner 0.1 and 0.2 themselves (tests/fixtures/old/, frozen by scripts/old_fixtures.py from
those versions' commits), read by today's code: the same captions as the version that wrote them."""

import json

import pytest
import torch

from captioner import Captioner
from captioner.inference import OnnxCaptioner
from tests.old_files import OLD, rebuilt_checkpoint, rebuilt_export


@pytest.mark.parametrize("version", ["0.1", "0.2"])
def test_a_checkpoint_an_older_version_wrote_captions_as_it_did(version, tmp_path):
    fixture = OLD / version
    frozen = json.loads((fixture / "frozen.json").read_text())
    path = tmp_path / "old.ckpt"
    torch.save(rebuilt_checkpoint(fixture), path)
    captioner = Captioner.from_checkpoint(path, device="cpu")
    images = sorted((fixture / "images").iterdir())
    assert dict(zip([image.name for image in images], captioner.caption(images))) == frozen["captions"]


def test_a_folder_0_2_exported_captions_torch_free_as_its_runtime_did(tmp_path):
    fixture = OLD / "0.2"  # 0.1 had no export
    frozen = json.loads((fixture / "frozen.json").read_text())
    folder = rebuilt_export(fixture, tmp_path / "export")
    assert json.loads((folder / "manifest.json").read_text())["version"] == 1  # the format 0.2 wrote, not today's
    captioner = OnnxCaptioner(folder)  # checks every graph against the digest 0.2 recorded
    images = sorted((fixture / "images").iterdir())
    assert dict(zip([image.name for image in images], captioner.caption(images))) == frozen["export"]["captions"]
