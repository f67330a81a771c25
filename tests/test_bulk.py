"""Bulk captioning as one job: two processes over shards with junk, killed with SIGKILL and run again, every good
image captioned once with the caption `Captioner` gives it; each output layout read back as its users read it."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
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

# With SLOW_CAPTIONING: the workers make their first claims together, once all have started (a worker that starts
# seconds after the others, on a loaded machine, could otherwise find every part taken).
TOGETHER = """
import os, time
from pathlib import Path
from captioner.jobs.claims import Claims
claim_next = Claims.claim_next
def together(self, *args, **kwargs):
    if not getattr(Claims, "started", False):
        Claims.started = True
        ready = Path(os.environ["CAPTIONER_TEST_READY"])
        (ready / str(os.getpid())).touch()
        deadline = time.monotonic() + 120
        while len(list(ready.iterdir())) < int(os.environ["CAPTIONER_TEST_WORKERS"]) and time.monotonic() < deadline:
            time.sleep(0.02)
    return claim_next(self, *args, **kwargs)
Claims.claim_next = together
"""


def job(checkpoint: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "captioner", "caption-set", "--ckpt_path", str(checkpoint), *args]
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


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
    args = [
        "--input",
        str(shards),
        "--format",
        "jsonl",
        "--output",
        str(output),
        "--batch_size",
        "4",
        "--trainer.accelerator",
        "cpu",
    ]
    process = job(checkpoint, *args, "--trainer.devices", "2", env={"PYTHONPATH": f"{slow}{os.pathsep}{ROOT}"})
    deadline, parts = time.monotonic() + 180, output / ".captioner-job" / "parts"
    # A part is done once its record is written, just after its output is put in place: wait for three records.
    while len(list(parts.glob("*.json"))) < 3 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done = len(list(parts.glob("*.json")))
    assert 3 <= done < 13, done  # killed part-way: some shards written whole, none in part
    assert len(list(output.glob("*.jsonl"))) >= done
    assert all(path.read_text().endswith("\n") for path in output.glob("*.jsonl"))  # whole, or not there

    # Run again by one process, in this one (any number of workers may take a job's remaining parts).
    err = caption_set(checkpoint, *args)
    assert not list(output.glob(".*.tmp"))  # what the kill left half-written is gone
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

    from captioner.bulk.command import caption_set_command
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
    expected = dict(
        zip(
            [p.relative_to(photos).as_posix() for p in sorted(photos.rglob("*.jpg")) if p.name != "notes.jpg"],
            Captioner.from_checkpoint(checkpoint, device="cpu").caption(
                [p for p in sorted(photos.rglob("*.jpg")) if p.name != "notes.jpg"],
                do_sample=True,
                seed=3,
                temperature=1.5,
            ),
        )
    )
    here(*common, "--format", "jsonl", "--output", str(tmp_path / "jsonl"), "--batch_size", "3")
    assert {row["image"]: row["caption"] for row in read_rows(tmp_path / "jsonl") if row["caption"]} == expected
    # The output folder scores as it is: `evaluate` reads its parts together (the copy under nested/ and the file
    # that is no picture are not images of the references).
    scored = evaluate_results(tmp_path / "jsonl", scenes_source / "captions.json", ExtraMetrics())
    assert scored["images"] == 9 and scored["not_matched"] == 2
    assert scored["metrics"]["pycocoevalcap"] == pytest.approx(
        coco_caption_scores(
            {name: caption for name, caption in expected.items() if "/" not in name},
            read_references(scenes_source / "captions.json")[0],
        )["scores"],
        abs=1e-3,
    )

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
    here(
        "--input",
        str(photos),
        "--format",
        "parquet",
        "--output",
        str(tmp_path / "reranked"),
        "--num_beams",
        "3",
        "--rerank_clip",
        clip,
    )
    rows = [
        row for row in pq.read_table(sorted((tmp_path / "reranked").glob("*.parquet"))).to_pylist() if row["caption"]
    ]
    reranking = Captioner.from_checkpoint(checkpoint, device="cpu", num_beams=3, rerank_clip=clip)
    pixels = [reranking.pixels_from_bytes((photos / row["image"]).read_bytes()) for row in rows]
    answers = reranking.describe(pixels)
    assert [(row["caption"], row["clip_score"]) for row in rows] == [
        (answer["caption"], pytest.approx(answer["clip_score"])) for answer in answers
    ]


def claims_of(output: Path) -> dict[str, str]:
    """Part -> the worker holding its latest claim, as the claim files say."""
    held = {}
    for path in sorted((output / ".captioner-job" / "claims").glob("*.lease")):
        try:
            held[path.name.rsplit(".", 2)[0]] = json.loads(path.read_text())["worker"]
        except (ValueError, KeyError, FileNotFoundError):
            continue
    return held


def test_three_independent_workers_one_killed_mid_part_caption_every_image_once(trained, shards, tmp_path):
    """No launcher, no rendezvous: three processes on one output folder (as a SLURM array or a Kubernetes Job would
    start them). One is SIGKILLed while it holds a part; the others take its part over and every image is captioned
    exactly once, the summary naming the workers that did the parts."""
    checkpoint, output = trained[0], tmp_path / "captions"
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(SLOW_CAPTIONING + TOGETHER)
    (ready := tmp_path / "ready").mkdir()
    args = [
        "--input",
        str(shards),
        "--format",
        "jsonl",
        "--output",
        str(output),
        "--batch_size",
        "4",
        "--launcher",
        "none",
        "--lease_seconds",
        "30",  # the killed worker's part is taken over at once (its process is gone); live ones renew theirs
        "--trainer.accelerator",
        "cpu",
    ]
    env = {
        "PYTHONPATH": f"{slow}{os.pathsep}{ROOT}",
        "OMP_NUM_THREADS": "1",
        "CAPTIONER_TEST_READY": str(ready),
        "CAPTIONER_TEST_WORKERS": "3",
    }
    workers = [job(checkpoint, *args, env=env) for _ in range(3)]
    victim = workers[0]
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not any(f"-{victim.pid}-" in who for who in claims_of(output).values()):
        assert victim.poll() is None, victim.communicate()[1][-3000:]
        time.sleep(0.05)
    taken = [part for part, who in claims_of(output).items() if f"-{victim.pid}-" in who]
    assert taken, "the victim never held a part"
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    errors = [finished(worker) for worker in workers[1:]]
    assert len(list(ready.iterdir())) == 3  # all three made their first claims together
    rows = read_rows(output)
    names = [row["image"] for row in rows]
    assert len(names) == len(set(names)) == 124  # 120 scenes, the key met twice, the junk: each exactly once
    state = output / ".captioner-job"
    survivors = {json.loads((state / "parts" / f"{part}.json").read_text())["worker"] for part in taken}
    assert all(f"-{victim.pid}-" not in who for who in survivors)  # the victim's part was finished by another
    summary = json.loads((state / "summary.json").read_text())
    assert summary["parts_done"] == summary["parts"] == 13 and summary["captioned"] == 122
    assert sum("images captioned" in err for err in errors) == 1  # the one that completes the job writes the summary


def caption_set(checkpoint: Path, *args: str) -> str:
    """`caption-set` in this process; what it printed on stderr."""
    import contextlib
    import io

    from captioner.bulk.command import caption_set_command

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        caption_set_command(["--ckpt_path", str(checkpoint), *args])
    return err.getvalue()


def test_a_rerun_with_other_settings_another_model_or_format_is_refused_naming_the_difference(
    trained, scenes_source, tmp_path, capsys
):
    """The user's first-day mistake: captioned with one beam, then the same command with five beams and a forced
    word into the same folder. It said "Nothing left to caption" and kept the old captions; now it refuses, says
    what differs, and `--overwrite` redoes the job."""
    from captioner.cli import main

    checkpoint = trained[0]
    photos = copy_scenes(scenes_source, tmp_path / "photos", 20)
    output = tmp_path / "out"
    first = ["--input", str(photos), "--output", str(output), "--format", "jsonl"]
    caption_set(checkpoint, *first, "--num_beams", "1")
    before = read_rows(output)
    for change, says in (
        (["--num_beams", "5", "--force_words", "red"], "decoding.num_beams: 1 before, 5 now"),
        (["--num_beams", "1", "--format", "parquet"], "format: 'jsonl' before, 'parquet' now"),
    ):
        with pytest.raises(SystemExit):
            main(["caption-set", "--ckpt_path", str(checkpoint), *first[:4], *change])
        refusal = capsys.readouterr().err.strip().splitlines()
        assert len(refusal) == 1 and says in refusal[0] and "--overwrite" in refusal[0]  # one line, what and how
        assert read_rows(output) == before  # nothing touched
    other = tmp_path / "other.ckpt"
    other.write_bytes(checkpoint.read_bytes() + b"\0")  # the same weights, another file: another model digest
    from captioner.core.errors import CaptionerError

    with pytest.raises(CaptionerError, match="model.sha256"):
        caption_set(other, *first, "--num_beams", "1")
    with pytest.raises(CaptionerError, match="decoding.force_words"):
        caption_set(checkpoint, *first, "--num_beams", "1", "--force_words", "red")
    again = caption_set(checkpoint, *first, "--num_beams", "5", "--force_words", "red", "--overwrite")
    assert "20 images captioned" in again
    rows = read_rows(output)
    assert all("red" in row["caption"].split() and row["constraints_met"] for row in rows)  # the new settings
    assert caption_set(checkpoint, *first, "--num_beams", "5", "--force_words", "red").startswith("Nothing left")


def test_every_format_records_its_provenance_and_the_summary_its_quality(trained, scenes_source, tmp_path):
    import pyarrow.parquet as pq
    import webdataset as wds

    from captioner.bulk.quality import caption_key, is_degenerate

    checkpoint = trained[0]
    photos = copy_scenes(scenes_source, tmp_path / "photos", 12)
    common = ["--input", str(photos), "--files_per_part", "5"]
    provenances = {}
    caption_set(checkpoint, *common, "--format", "jsonl", "--output", str(tmp_path / "jsonl"), "--review_below", "0.6")
    provenances["jsonl"] = json.loads((tmp_path / "jsonl" / "files-000000.provenance.json").read_text())
    caption_set(checkpoint, *common, "--format", "parquet", "--output", str(tmp_path / "parquet"))
    metadata = pq.read_metadata(tmp_path / "parquet" / "files-000000.parquet").metadata
    provenances["parquet"] = json.loads(metadata[b"captioner.provenance"])
    caption_set(checkpoint, *common, "--format", "webdataset", "--output", str(tmp_path / "shards"))
    sample = next(iter(wds.WebDataset(str(tmp_path / "shards" / "files-000000.tar"), shardshuffle=False)))
    provenances["webdataset"] = json.loads(sample["json"])["captioned_by"]
    caption_set(checkpoint, *common, "--format", "txt")
    provenances["txt"] = json.loads((photos / ".captioner-job" / "parts" / "files-000000.json").read_text())
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    for kind, provenance in provenances.items():
        assert provenance["model"] == {"sha256": digest} and provenance["captioner"], kind
        assert len(provenance["job"]) == 16, kind
    assert provenances["jsonl"]["decoding"]["num_beams"] == provenances["parquet"]["decoding"]["num_beams"]

    # The summary's quality, against the rows themselves.
    summary = json.loads((tmp_path / "jsonl" / ".captioner-job" / "summary.json").read_text())
    rows = read_rows(tmp_path / "jsonl")
    captions = [row["caption"] for row in rows]
    shared = sum(1 for c in captions if sum(caption_key(o) == caption_key(c) for o in captions) > 1)
    quality = summary["quality"]
    assert quality["duplicate_share"] == pytest.approx(shared / len(captions), abs=1e-4)
    assert quality["degenerate_share"] == pytest.approx(sum(map(is_degenerate, captions)) / len(captions), abs=1e-4)
    confidences = [row["confidence"] for row in rows]
    assert quality["confidence"]["mean"] == pytest.approx(np.mean(confidences), abs=1e-3)
    assert quality["confidence"]["below_0.5"] == pytest.approx(np.mean([c < 0.5 for c in confidences]), abs=1e-4)
    # The review: every image under 0.6, least confident first, in the page and the listing.
    review = [json.loads(line) for line in (tmp_path / "jsonl" / "review" / "review.jsonl").read_text().splitlines()]
    expected = sorted((row for row in rows if row["confidence"] < 0.6), key=lambda row: row["confidence"])
    assert [r["image"] for r in review] == [r["image"] for r in expected] and review
    page = (tmp_path / "jsonl" / "review" / "index.html").read_text()
    assert page.count("<figure>") == len(review) and page.count("data:image/jpeg;base64,") == len(review)
    assert summary["review"]["images"] == len(review)


def test_the_ray_data_path_captions_as_the_engine_does_into_parquet(trained, shards, tmp_path):
    """`--launcher ray` on a local Ray (2 CPUs): Ray reads the shards, actors caption them with the engine, and the
    Parquet rows equal the other launchers' for the same images, with the job's provenance in each file."""
    import pyarrow.parquet as pq
    import ray

    checkpoint = trained[0]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        err = caption_set(
            checkpoint,
            "--input",
            str(shards),
            "--format",
            "parquet",
            "--output",
            str(tmp_path / "ray"),
            "--launcher",
            "ray",
            "--ray_workers",
            "1",
            "--batch_size",
            "16",
        )
    finally:
        ray.shutdown()
    assert "images captioned" in err
    table = pq.read_table(tmp_path / "ray")
    by_ray = {row["image"]: row for row in table.to_pylist()}  # <shard>#<member>, as the other launchers name them
    assert len(by_ray) == 124
    caption_set(checkpoint, "--input", str(shards), "--format", "jsonl", "--output", str(tmp_path / "engine"))
    by_engine = {row["image"]: row for row in read_rows(tmp_path / "engine")}
    assert {k: r["caption"] for k, r in by_ray.items()} == {k: r["caption"] for k, r in by_engine.items()}
    assert {k for k, r in by_ray.items() if r["error"]} == {k for k, r in by_engine.items() if r["error"]}
    metadata = pq.read_schema(next((tmp_path / "ray").glob("*.parquet"))).metadata
    assert json.loads(metadata[b"captioner.provenance"])["model"]["sha256"]
