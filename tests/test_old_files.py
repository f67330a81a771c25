"""Checkpoints written by captioner 0.1 and 0.2 themselves (tests/fixtures/old/, frozen by scripts/old_fixtures.py
from those versions' commits), read by today's code: the same captions as the version that wrote them."""

import hashlib
import json

import pytest
import torch
import torchvision

from captioner import Captioner
from tests.conftest import TESTS

OLD = TESTS / "fixtures" / "old"


def rebuilt(fixture) -> dict:
    """The checkpoint as that version wrote it: its frozen encoder's tensors (a ResNet18 seeded as every version
    seeds it) put back, each checked against the digest of the tensor written."""
    frozen = json.loads((fixture / "frozen.json").read_text())
    checkpoint = torch.load(fixture / "checkpoint.pt", map_location="cpu", weights_only=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(frozen["encoder"]["seed"])
        network = torchvision.models.get_model(frozen["encoder"]["torchvision"], weights=None)
    network.fc = torch.nn.Identity()
    tensors = {f"encoder.net.{name}": tensor for name, tensor in network.state_dict().items()}
    assert set(tensors) == set(frozen["left_out"])
    for name, expected in frozen["left_out"].items():
        tensor = tensors[name]
        assert [list(tensor.shape), str(tensor.dtype)] == [expected["shape"], expected["dtype"]], name
        assert hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest() == expected["sha256"], name
    checkpoint["state_dict"].update(tensors)
    return checkpoint


@pytest.mark.parametrize("version", ["0.1", "0.2"])
def test_a_checkpoint_an_older_version_wrote_captions_as_it_did(version, tmp_path):
    fixture = OLD / version
    frozen = json.loads((fixture / "frozen.json").read_text())
    path = tmp_path / "old.ckpt"
    torch.save(rebuilt(fixture), path)
    captioner = Captioner.from_checkpoint(path, device="cpu")
    images = sorted((fixture / "images").iterdir())
    assert dict(zip([image.name for image in images], captioner.caption(images))) == frozen["captions"]
