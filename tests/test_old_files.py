"""Files written by captioner 0.1 and 0.2 themselves (tests/fixtures/old/, frozen by scripts/old_fixtures.py from
those versions' commits), read by today's code: the same captions as the version that wrote them, with the same
scores, on 16 images (4 of the scenes it trained on, 12 it never saw)."""

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
    assert len(images) == 16 and len(set(frozen["captions"].values())) > 4  # captions that tell images apart
    rows = {image.name: row for image, row in zip(images, captioner.predict(images))}
    assert {name: row.caption for name, row in rows.items()} == frozen["captions"]
    for name, row in rows.items():
        assert row.score == pytest.approx(frozen["scores"][name], abs=1e-4), name


def test_a_folder_0_2_exported_captions_torch_free_as_its_runtime_did(tmp_path):
    fixture = OLD / "0.2"  # 0.1 had no export
    frozen = json.loads((fixture / "frozen.json").read_text())
    folder = rebuilt_export(fixture, tmp_path / "export")
    assert json.loads((folder / "manifest.json").read_text())["version"] == 1  # the format 0.2 wrote, not today's
    captioner = OnnxCaptioner(folder)  # checks every graph against the digest 0.2 recorded
    images = sorted((fixture / "images").iterdir())
    rows = {image.name: row for image, row in zip(images, captioner.predict(images))}
    assert {name: row.caption for name, row in rows.items()} == frozen["export"]["captions"]
    for name, row in rows.items():
        # Today's runtime scores a caption as PyTorch does (0.2's PyTorch score, to 1e-4); 0.2's own runtime was off
        # by up to 1.1e-3 (measured on these 16 images), which is what this folder's captions were ranked with then.
        assert row.score == pytest.approx(frozen["scores"][name], abs=1e-4), name
        assert row.score == pytest.approx(frozen["export"]["scores"][name], abs=2e-3), name
