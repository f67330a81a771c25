"""Bulk captioning as one job: two processes over shards with junk, killed with SIGKILL and run again, every good
image captioned once with the caption `Captioner` gives it; each output layout read back as its users read it."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from captioner import Captioner
from captioner.bulk.job import read_rows
from captioner.data.synthetic import write_synthetic_shards
from tests.conftest import TESTS, copy_scenes

ROOT = TESTS.parent
SLOW_CAPTIONING = """
import time
from captioner.inference import Captioner
describe = Captioner.describe
def slow(self, *args, **kwargs):
    time.sleep(0.25)
    return describe(self, *args, **kwargs)
Captioner.describe = slow
"""


def job(checkpoint: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "captioner", "caption-set", "--ckpt_path", str(checkpoint), *args]
    return subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip


def finished(process: subprocess.Popen) -> str:
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    return err


@pytest.fixture(scope="module")
def shards(scenes_source, tmp_path_factory) -> Path:
    """The 120 scenes as 13 shards of 10 (the junk real shards hold in the last)."""
    return write_synthetic_shards(scenes_source, tmp_path_factory.mktemp("bulk") / "shards", per_shard=10, junk=True)


def test_two_processes_killed_and_run_again_caption_every_image_once(trained, shards, scenes_source, tmp_path):
    checkpoint, output = trained[0], tmp_path / "captions"
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(SLOW_CAPTIONING)  # every process the job launches captions slowly
    args = ["--input", str(shards), "--format", "jsonl", "--output", str(output), "--batch_size", "4",
            "--trainer.devices", "2", "--trainer.accelerator", "cpu"]  # fmt: skip
    process = job(checkpoint, *args, env={"PYTHONPATH": f"{slow}{os.pathsep}{ROOT}"})
    deadline = time.monotonic() + 180
    while len(list(output.glob("*.jsonl"))) < 3 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done = len(list(output.glob("*.jsonl")))
    assert 3 <= done < 13, done  # killed part-way: some shards written whole, none in part
    assert not list(output.glob(".*.tmp")) and all(path.read_text().endswith("\n") for path in output.glob("*.jsonl"))

    err = finished(job(checkpoint, *args))
    summary = json.loads((output / ".captioner-job" / "summary.json").read_text())
    assert summary["parts_done_before"] == done and summary["parts"] == 13
    rows = read_rows(output)
    names = [row["image"] for row in rows]
    assert len(names) == len(set(names)) == 124  # 120 scenes, the key met twice, the three junk samples: each once
    failed = {row["image"]: row["error"] for row in rows if row["error"]}
    assert set(failed) == {"00012.tar#junk-cut-short.jpg", "00012.tar#junk-no-image."}, failed
    assert "truncated" in failed["00012.tar#junk-cut-short.jpg"].lower()
    assert "no image in this sample" in failed["00012.tar#junk-no-image."]
    assert sum(summary["failed"].values()) == 2 and "2 failed" in err

    # The captions `Captioner` gives the same pictures, one at a time.
    captioner = Captioner.from_checkpoint(checkpoint, device="cpu", batch_size=1)
    by_key = {row["image"].split("#")[1].split(".")[0]: row["caption"] for row in rows if row["caption"]}
    files = sorted((scenes_source / "Images").iterdir())[:12]
    for path, caption in zip(files, captioner.caption(files)):
        assert by_key[path.stem] == caption, path.name


def test_each_output_layout_reads_back_with_the_library_its_users_use(trained, scenes_source, tmp_path, capsys):
    import pyarrow.parquet as pq
    import webdataset as wds

    from captioner.bulk.job import caption_set_command
    from captioner.evaluation.beyond import ExtraMetrics
    from captioner.evaluation.evaluate import evaluate_results, read_references
    from captioner.evaluation.metrics import coco_caption_scores

    def here(*args: str) -> str:  # the command's own entry point in this process (no start-up each); its stderr
        caption_set_command(["--ckpt_path", str(checkpoint), *args])
        return capsys.readouterr().err

    checkpoint = trained[0]
    photos = copy_scenes(scenes_source, tmp_path / "photos", 9)
    (photos / "nested").mkdir()
    (photos / "nested" / "deeper.jpg").write_bytes(sorted(photos.glob("*.jpg"))[-1].read_bytes())
    (photos / "notes.jpg").write_bytes(b"not a picture")
    common = ["--input", str(photos), "--files_per_part", "4", "--do_sample", "--seed", "3", "--temperature", "1.5"]
    expected = dict(zip(
        [p.relative_to(photos).as_posix() for p in sorted(photos.rglob("*.jpg")) if p.name != "notes.jpg"],
        Captioner.from_checkpoint(checkpoint, device="cpu").caption(
            [p for p in sorted(photos.rglob("*.jpg")) if p.name != "notes.jpg"], do_sample=True, seed=3,
            temperature=1.5),
    ))  # fmt: skip
    here(*common, "--format", "jsonl", "--output", str(tmp_path / "jsonl"), "--batch_size", "3")
    assert {row["image"]: row["caption"] for row in read_rows(tmp_path / "jsonl") if row["caption"]} == expected
    # The output folder scores as it is: `evaluate` reads its parts together (the copy under nested/ and the file
    # that is no picture are not images of the references).
    scored = evaluate_results(tmp_path / "jsonl", scenes_source / "captions.json", ExtraMetrics())
    assert scored["images"] == 9 and scored["not_matched"] == 2
    assert scored["metrics"]["pycocoevalcap"] == pytest.approx(coco_caption_scores(
        {name: caption for name, caption in expected.items() if "/" not in name},
        read_references(scenes_source / "captions.json")[0])["scores"], abs=1e-3)  # fmt: skip

    here(*common, "--format", "parquet", "--output", str(tmp_path / "parquet"))
    table = pq.read_table(sorted((tmp_path / "parquet").glob("*.parquet")))
    assert {row["image"]: row["caption"] for row in table.to_pylist() if row["caption"]} == expected
    assert [row["error"] is not None for row in table.to_pylist()].count(True) == 1

    here(*common, "--format", "webdataset", "--output", str(tmp_path / "shards"))
    samples = list(wds.WebDataset(sorted(str(p) for p in (tmp_path / "shards").glob("*.tar")), shardshuffle=False))
    assert {json.loads(s["json"])["source"]: s["txt"].decode() for s in samples} == expected
    assert all("jpg" in s for s in samples)

    here(*common, "--format", "txt", "--batch_size", "2")
    assert {name: (photos / name).with_suffix(".txt").read_text().strip() for name in expected} == expected
    again = here(*common, "--format", "txt", "--overwrite")
    assert "10 images captioned, 1 failed" in again  # every image, again
    rerun = here(*common, "--format", "txt")
    assert "Nothing left to caption: all 3 parts were done before this run" in rerun  # says so, and how to redo

    # Reranked by a CLIP: each Parquet row carries the CLIP-S `Captioner` gives the same picture.
    from captioner.evaluation.clip_score import write_random_clip

    clip = str(write_random_clip(tmp_path / "clip", "a the red blue green circle square triangle left right".split()))
    here("--input", str(photos), "--format", "parquet", "--output", str(tmp_path / "reranked"), "--num_beams", "3",
         "--rerank_clip", clip)  # fmt: skip
    rows = [row for row in pq.read_table(sorted((tmp_path / "reranked").glob("*.parquet"))).to_pylist()
            if row["caption"]]  # fmt: skip
    reranking = Captioner.from_checkpoint(checkpoint, device="cpu", num_beams=3, rerank_clip=clip)
    pixels = [reranking.pixels_from_bytes((photos / row["image"]).read_bytes()) for row in rows]
    answers = reranking.describe(pixels)
    assert [(row["caption"], row["clip_score"]) for row in rows] == [
        (answer["caption"], pytest.approx(answer["clip_score"])) for answer in answers]
