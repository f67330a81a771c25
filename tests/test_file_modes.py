"""Files a run writes carry the permissions a plain `open` would give them under the user's umask, so a team sharing
a runs folder, or a service account serving an exported model, can read them."""

import os
import stat

import pytest

from captioner.core.files import atomic_folder, atomic_open, write_json
from captioner.export.onnx import export_onnx
from captioner.models.checkpoints import AtomicCheckpointIO
from captioner.models.module import CaptionModel


@pytest.fixture(params=[0o022, 0o077], ids=["umask-022", "umask-077"])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_files_folders_checkpoints_and_exports_get_the_plain_modes(umask, tmp_path, trained):
    plain_file, plain_folder = tmp_path / "plain.txt", tmp_path / "plain"
    plain_file.write_text("x")
    plain_folder.mkdir()
    assert mode(plain_file) == 0o666 & ~umask and mode(plain_folder) == 0o777 & ~umask

    write_json(tmp_path / "test_metrics.json", {"cider": 1.0})
    with atomic_open(tmp_path / "captions.txt") as handle:
        handle.write("a red circle\n")
    AtomicCheckpointIO().save_checkpoint({"state_dict": {}}, tmp_path / "checkpoints" / "last.ckpt")
    with atomic_folder(tmp_path / "folder") as folder:
        (folder / "inside.txt").write_text("x")
    for written in ("test_metrics.json", "captions.txt", "checkpoints/last.ckpt", "folder/inside.txt"):
        assert mode(tmp_path / written) == mode(plain_file), written
    assert mode(tmp_path / "folder") == mode(plain_folder)

    exported = export_onnx(CaptionModel.from_checkpoint(str(trained[0])), tmp_path / "exported")
    assert mode(exported) == mode(plain_folder)
    assert {path.name: mode(path) for path in exported.iterdir()} == {
        path.name: mode(plain_file) for path in exported.iterdir()
    }


def test_the_trained_checkpoints_are_readable_by_the_group_under_umask_022(trained):
    """The session's training run (umask 022 here): what `fit` wrote, not only what these helpers write."""
    previous = os.umask(0o022)
    os.umask(previous)
    if previous != 0o022:
        pytest.skip("the test process does not run under umask 022")
    checkpoints = list(trained[0].parent.glob("*.ckpt"))
    assert checkpoints and all(mode(path) == 0o644 for path in checkpoints)
