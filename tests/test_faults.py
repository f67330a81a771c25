"""Hostile input and interruptions: nothing lost, nothing silently wrong, every error says what to do."""

import errno
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.cli import main
from captioner.core.errors import CaptionerError
from captioner.core.files import atomic_open, write_json
from captioner.encoders.torchvision_models import TorchvisionEncoder
from captioner.features.cache import INDEX_FILE, PARTS_DIR, prepare_cache
from captioner.features.keys import FeatureSpec
from captioner.runs import run_dir
from captioner.sources.images import find_images
from tests.conftest import TESTS, last_checkpoint, predict_args, tiny_args

ROOT = TESTS.parent
SPEC = FeatureSpec(TorchvisionEncoder("resnet18", None, 32))

KILLABLE_EXTRACTION = """
import sys, time
from captioner.encoders.base import ImageEncoder
from captioner.encoders.torchvision_models import TorchvisionEncoder
from captioner.features.cache import prepare_cache
from captioner.features.keys import FeatureSpec
forward = ImageEncoder.forward
def slow(self, images, grid=False):
    time.sleep(0.3)
    return forward(self, images, grid)
ImageEncoder.forward = slow
names = sys.argv[3:]
spec = FeatureSpec(TorchvisionEncoder("resnet18", None, 32))
prepare_cache(sys.argv[1], sys.argv[2], names, spec, batch_size=4, threads=1, per_part=8)
"""


def test_sigkill_during_extraction_resumes_to_an_identical_cache(scenes, tmp_path):
    names = sorted(p.name for p in (scenes / "Images").iterdir())[:32]
    reference = prepare_cache(tmp_path / "reference", scenes / "Images", names, SPEC, batch_size=4, per_part=8)
    script = tmp_path / "extract.py"
    script.write_text(KILLABLE_EXTRACTION)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "killed"), str(scenes / "Images"), *names],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    done: list = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        done = list((tmp_path / "killed").glob(f"*/{PARTS_DIR}/*.json")) if (tmp_path / "killed").exists() else []
        if done:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert done, "extraction never finished a part"
    folder = done[0].parent.parent
    finished = len(list((folder / PARTS_DIR).glob("*.json")))
    assert 1 <= finished < 4 and not (folder / INDEX_FILE).exists()
    resumed = prepare_cache(tmp_path / "killed", scenes / "Images", names, SPEC, batch_size=4, per_part=8)
    np.testing.assert_array_equal(np.asarray(resumed.features), np.asarray(reference.features))


def test_fit_resumes_from_last_with_epoch_optimizer_and_schedule(scenes, tmp_path, capsys):
    first = main(tiny_args("fit", scenes, tmp_path / "work", tmp_path, "--trainer.max_epochs", "2"))
    last = last_checkpoint(first.trainer)
    saved = torch.load(last, weights_only=False)
    assert saved["epoch"] == 1 and saved["optimizer_states"][0]["state"]

    resumed = main(
        tiny_args("fit", scenes, tmp_path / "work", tmp_path, "--trainer.max_epochs", "3", "--ckpt_path", "last")
    )
    assert f"Resuming from {last}" in capsys.readouterr().err
    trainer = resumed.trainer
    assert trainer.current_epoch == 3
    steps_per_epoch = saved["global_step"] // 2
    assert trainer.global_step == saved["global_step"] + steps_per_epoch
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == saved["lr_schedulers"][0]["last_epoch"] + steps_per_epoch


def test_no_last_checkpoint_is_a_clear_error(scenes, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(tiny_args("fit", scenes, tmp_path / "work", tmp_path, "--ckpt_path", "last"))
    assert exit_info.value.code == 2 and "no last.ckpt" in capsys.readouterr().err


def test_dataset_faults_are_counted_in_one_summary_and_the_rest_trains(scenes, tmp_path, caplog):
    images = scenes / "Images"
    names = sorted(p.name for p in images.iterdir())
    data = (images / names[0]).read_bytes()
    (images / names[0]).write_bytes(data[: len(data) // 2])  # truncated JPEG
    (images / names[1]).write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")  # corrupt
    (images / names[2]).write_bytes(b"")  # zero bytes
    Image.new("RGB", (4000, 3000), "red").save(images / names[3])  # huge
    Image.open(images / names[4]).convert("CMYK").save(images / names[4])  # odd mode
    payload = json.loads((scenes / "captions.json").read_text())
    first_id = payload["images"][5]["id"]
    payload["annotations"] += [
        {"image_id": first_id, "caption": ""},
        {"image_id": first_id, "caption": "Un cercle rouge à gauche, très joli"},
        {"image_id": first_id, "caption": " ".join(["word"] * 60)},
        dict(payload["annotations"][0]),
        {"image_id": 987654, "caption": "no such image"},
    ]
    # Accented words on a few more images, so some of them are training images whatever the split draws.
    payload["annotations"] += [
        {"image_id": image["id"], "caption": "Un cercle rouge à gauche, très joli"} for image in payload["images"][6:12]
    ]
    payload["images"].append({"id": 555555, "file_name": "never_written.jpg"})
    payload["annotations"].append({"image_id": 555555, "caption": "a caption for a missing file"})
    (scenes / "captions.json").write_text(json.dumps(payload))

    with caplog.at_level(logging.INFO):
        cli = main(
            tiny_args(
                "fit",
                scenes,
                tmp_path / "work",
                tmp_path,
                "--trainer.fast_dev_run",
                "true",
                "--data.captions.max_length",
                "20",
            )
        )
    summaries = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Dataset ")]
    assert len(summaries) == 1
    summary = summaries[0]
    for part in (
        "1 image files missing",
        "1 image files empty (0 bytes)",
        "1 empty captions",
        "1 duplicate captions",
        "1 captions whose image_id matches no image",
        "2 images that could not be decoded",
        "1 captions longer than the maximum length are cut",
    ):
        assert part in summary, (part, summary)
    datamodule = cli.datamodule
    assert sum(datamodule.split_sizes.values()) == 120 - 3  # empty file skipped, two undecodable left out
    assert "à" in datamodule.vocabulary.stoi and "très" in datamodule.vocabulary.stoi


def test_a_dataset_with_nothing_usable_is_a_clear_error(scenes, tmp_path, capsys):
    for path in (scenes / "Images").iterdir():
        path.write_bytes(b"not an image")
    with pytest.raises(SystemExit) as exit_info:
        main(tiny_args("fit", scenes, tmp_path / "work", tmp_path, "--trainer.fast_dev_run", "true"))
    assert exit_info.value.code == 2
    assert "None of the 120 images" in capsys.readouterr().err
    assert not list((tmp_path / "work" / "features").glob(f"*/{INDEX_FILE}"))


def test_folder_scan_survives_loops_unreadable_folders_and_odd_names(tmp_path, monkeypatch):
    root = tmp_path / "photos"
    (root / "sub dir ünïcode").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "sub dir ünïcode" / "mé photo 1.jpg")
    Image.new("RGB", (8, 8)).save(root / "日本.png")
    (root / "loop").symlink_to(root, target_is_directory=True)
    (root / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (root / "locked").mkdir()
    Image.new("RGB", (8, 8)).save(root / "locked" / "hidden.jpg")
    real_scandir = os.scandir

    def scandir(path):
        if str(path).endswith("locked"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    scan = find_images(root)
    assert [p.name for p in scan.images] == ["mé photo 1.jpg", "日本.png"]
    assert any("locked" in problem for problem in scan.unreadable_folders)
    assert any(link.endswith("loop") for link in scan.skipped_links)
    assert any(link.endswith("dangling.jpg") for link in scan.skipped_links)


def test_predict_handles_names_with_spaces_and_non_ascii(trained, scenes_source, tmp_path):
    checkpoint, _ = trained
    photos = tmp_path / "my photos"
    (photos / "été 2024").mkdir(parents=True)
    source = next((scenes_source / "Images").iterdir())
    Image.open(source).save(photos / "été 2024" / "plage à Nice.jpg")
    Image.open(source).save(photos / "写真 1.png")
    cli = main(predict_args(checkpoint, photos, tmp_path / "runs", "--predictions.write_images", "true"))
    folder = run_dir(cli.trainer)
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sorted(r["image"].rsplit("/", 1)[-1] for r in rows) == ["plage à Nice.jpg", "写真 1.png"]
    assert all(r["caption"] for r in rows)
    assert (folder / "captioned" / "été 2024" / "plage à Nice.jpg.png").is_file()


def test_disk_full_leaves_the_previous_file_and_no_partial_one(tmp_path, monkeypatch):
    path = tmp_path / "vocab.json"
    write_json(path, {"version": "old"})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(CaptionerError, match="No space left on device while writing .*vocab.json"):
        write_json(path, {"version": "new"})
    assert json.loads(path.read_text()) == {"version": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["vocab.json"]
    with pytest.raises(CaptionerError), atomic_open(tmp_path / "fresh.bin", "wb") as handle:
        handle.write(b"x")
    assert not (tmp_path / "fresh.bin").exists()


def test_disk_full_for_the_feature_cache_fails_before_extracting(scenes, tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    names = sorted(p.name for p in (scenes / "Images").iterdir())[:4]
    with pytest.raises(CaptionerError, match="No space left on device for the feature cache"):
        prepare_cache(tmp_path, scenes / "Images", names, SPEC)
    key = SPEC.key(names)
    assert not list(tmp_path.glob(f"*{key[:12]}/**/*.npy"))


def test_a_checkpoint_cut_short_by_a_full_disk_leaves_the_previous_one_whole(scenes, tmp_path, monkeypatch, capsys):
    """The disk fills half-way through writing a checkpoint: the run stops with a message, the checkpoint it was
    replacing is the one before, byte for byte, and no partial file is left for a later run to trust."""
    cli = main(tiny_args("fit", scenes, tmp_path / "work", tmp_path, "--trainer.max_epochs", "1"))
    last = Path(last_checkpoint(cli.trainer))
    before, files = last.read_bytes(), sorted(p.name for p in last.parent.iterdir())
    real_save = torch.save

    def half_then_full(payload, handle, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(payload, buffer)
        handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # half of it reaches the disk
        handle.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_full)
    with pytest.raises(SystemExit) as exit_info:
        main(
            tiny_args("fit", scenes, tmp_path / "work", tmp_path, "--trainer.max_epochs", "2", "--ckpt_path", str(last))
        )
    assert exit_info.value.code == 2 and "No space left on device" in capsys.readouterr().err
    assert last.read_bytes() == before and sorted(p.name for p in last.parent.iterdir()) == files
    assert torch.load(last, weights_only=True)["global_step"] > 0  # still a checkpoint a resume can read


def test_checkpoint_from_another_vocabulary_is_refused(trained, scenes_source, tmp_path, capsys):
    checkpoint, work = trained
    with pytest.raises(SystemExit) as exit_info:
        main(
            tiny_args(
                "test",
                scenes_source,
                tmp_path / "other-work",
                tmp_path,
                "--ckpt_path",
                str(checkpoint),
                "--data.captions.min_word_count",
                "60",
            )
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "tokenizer" in err and "--data.captions" in err
