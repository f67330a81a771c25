"""Numbers that compare with papers: COCOEvalCap agrees, Karpathy splits, val/cider, artefacts per settings."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from captioner.cli import main
from captioner.evaluation.cider import CiderD
from captioner.evaluation.metrics import JAVA_VARIABLE, CorpusCider, java_available
from captioner.models import captioning
from captioner.runs import run_dir
from tests.conftest import TESTS, tiny_args

ROOT = TESTS.parent


@pytest.mark.skipif(shutil.which("java") is None, reason="the COCO caption evaluation needs Java")
def test_reported_scores_equal_cocoevalcap_on_the_written_results_and_raw_references(
    trained, scenes_source, tmp_path, monkeypatch
):
    from pycocoevalcap import eval as coco_eval
    from pycocotools.coco import COCO

    monkeypatch.setenv(JAVA_VARIABLE, "1")  # the PTB tokenizer and METEOR, as COCOEvalCap runs them (conftest: off)
    assert java_available()
    checkpoint, work = trained
    tested = main(tiny_args("test", scenes_source, work, tmp_path, "--ckpt_path", str(checkpoint)))
    folder = run_dir(tested.trainer)
    report = json.loads((folder / "test_metrics.json").read_text())["metrics"]["pycocoevalcap"]
    rows = [json.loads(line) for line in (folder / "test_captions.jsonl").read_text().splitlines()]
    raw = [ref for row in rows for ref in row["references"]]
    assert any(ref != ref.lower() for ref in raw) and any(ref.rstrip().endswith(".") for ref in raw)  # as written
    assert all(len(row["references"]) == 5 and isinstance(row["image_id"], int) for row in rows)

    class NoSpice:  # SPICE needs a download; the other scorers are COCOEvalCap's own
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "SPICE"

    monkeypatch.setattr(coco_eval, "Spice", NoSpice)
    coco = COCO(str(folder / "captions_test_references.json"))
    results = coco.loadRes(str(folder / "captions_test_results.json"))
    evaluator = coco_eval.COCOEvalCap(coco, results)
    evaluator.evaluate()
    names = {
        "Bleu_1": "BLEU-1",
        "Bleu_2": "BLEU-2",
        "Bleu_3": "BLEU-3",
        "Bleu_4": "BLEU-4",
        "METEOR": "METEOR",
        "ROUGE_L": "ROUGE-L",
        "CIDEr": "CIDEr",
    }
    for theirs, ours in names.items():
        assert report[ours] == pytest.approx(100 * evaluator.eval[theirs], abs=1e-3), ours


def karpathy_split_file(scenes, path):
    """A Karpathy file for the scenes: 70 train, 10 restval, 20 val, 20 test, two absent pictures, no sentences."""
    payload = json.loads((scenes / "captions.json").read_text())
    captions = {}
    for annotation in payload["annotations"]:
        captions.setdefault(annotation["image_id"], []).append({"raw": annotation["caption"]})
    labels = ["train"] * 70 + ["restval"] * 10 + ["val"] * 20 + ["test"] * 20
    entries = [
        {
            "filename": image["file_name"],
            "filepath": "Images",
            "split": label,
            "cocoid": image["id"],
            "sentences": captions[image["id"]],
        }
        for image, label in zip(payload["images"], labels)
    ]
    entries += [
        {"filename": "absent1.jpg", "filepath": "Images", "split": "test", "cocoid": -1, "sentences": []},
        {
            "filename": "absent2.jpg",
            "filepath": "Images",
            "split": "train",
            "cocoid": -2,
            "sentences": [{"raw": "a picture that is not there"}],
        },
    ]
    path.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return path


@pytest.mark.parametrize("restval", ["train", "drop"])
def test_karpathy_split_file_decides_the_splits(scenes, tmp_path, restval, caplog):
    split_file = karpathy_split_file(scenes, tmp_path / "dataset_coco.json")
    cli = main(
        tiny_args(
            "fit",
            scenes,
            tmp_path / "work",
            tmp_path,
            "--trainer.fast_dev_run",
            "true",
            "--data.splits.file",
            str(split_file),
            "--data.splits.restval",
            restval,
        )
    )
    assert cli.datamodule.split_sizes == {"train": 80 if restval == "train" else 70, "val": 20, "test": 20}
    summary = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Dataset "))
    assert "2 images the split file names that the data lacks" in summary


def test_a_karpathy_file_as_the_caption_format_gives_captions_and_splits(scenes, tmp_path):
    folder = tmp_path / "karpathy"
    folder.mkdir()
    (folder / "Images").symlink_to(scenes / "Images")
    karpathy_split_file(scenes, folder / "dataset_coco.json")
    cli = main(tiny_args("fit", folder, tmp_path / "work", tmp_path, "--trainer.fast_dev_run", "true"))
    assert cli.datamodule.split_sizes == {"train": 80, "val": 20, "test": 20}


def test_val_cider_is_logged_monitored_and_equals_cider_d_on_the_val_references(scenes, tmp_path):
    cli = main(tiny_args("fit", scenes, tmp_path / "work", tmp_path, "--trainer.max_epochs", "2"))
    assert cli.trainer.checkpoint_callback.monitor == "val/cider"
    logged = float(cli.trainer.callback_metrics["val/cider"])
    model, val = cli.model.eval(), cli.datamodule.datasets["val"]
    batch = cli.datamodule.materialize(val.__getitems__(list(range(len(val)))))
    with torch.no_grad():
        generated = model.vocabulary.words_of(
            captioning.decode_features(model, batch["features"], model.decoding.greedy()).best_tokens
        )
    scorer = CiderD(val.reference_ids)  # document frequencies from the validation references
    expected = 100 * sum(scorer.score(g, refs) for g, refs in zip(generated, val.reference_ids)) / len(val)
    assert logged == pytest.approx(expected, rel=1e-4) and logged > 0


def test_corpus_cider_sums_over_batches_like_one_pass():
    references = [[[4, 5, 6], [4, 5]], [[7, 8], [7, 8, 9]], [[4, 9]]]
    candidates = [[4, 5], [7, 8, 9], [9]]
    whole, parts = CorpusCider(), CorpusCider()
    for metric in (whole, parts):
        metric.set_references(references)
    whole.update(candidates, [0, 1, 2])
    parts.update(candidates[:1], [0])
    parts.update(candidates[1:], [1, 2])
    scorer = CiderD(references)
    expected = 100 * sum(scorer.score(c, r) for c, r in zip(candidates, references)) / 3
    assert float(whole.compute()) == pytest.approx(expected) == pytest.approx(float(parts.compute()))


# ---------------------------------------------------------------- a sweep over data settings sharing a work_dir
def test_runs_with_other_vocabulary_settings_keep_their_own_vocabularies_in_sequence(scenes, tmp_path):
    work, checkpoints = tmp_path / "work", {}
    for count in (1, 60):
        cli = main(
            tiny_args(
                "fit",
                scenes,
                work,
                tmp_path / f"run{count}",
                "--trainer.max_epochs",
                "1",
                "--data.captions.min_word_count",
                str(count),
            )
        )
        checkpoints[count] = (cli.trainer.checkpoint_callback.best_model_path, len(cli.datamodule.vocabulary))
    assert checkpoints[1][1] > checkpoints[60][1]  # the threshold made different vocabularies
    assert len(list((work / "prepared").iterdir())) == 2
    for count, (checkpoint, size) in checkpoints.items():  # testing the earlier run afterwards finds its own
        tested = main(
            tiny_args(
                "test",
                scenes,
                work,
                tmp_path / f"test{count}",
                "--ckpt_path",
                checkpoint,
                "--data.captions.min_word_count",
                str(count),
            )
        )
        assert len(tested.datamodule.vocabulary) == size


@pytest.mark.slow
def test_runs_with_other_vocabulary_settings_keep_their_own_vocabularies_in_parallel(scenes, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    work = tmp_path / "work"
    main(tiny_args("fit", scenes, work, tmp_path / "warm", "--trainer.fast_dev_run", "true"))  # features cached once
    processes = {
        count: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "captioner",
                *tiny_args(
                    "fit",
                    scenes,
                    work,
                    tmp_path / f"run{count}",
                    "--trainer.max_epochs",
                    "1",
                    "--data.captions.min_word_count",
                    str(count),
                ),
            ],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for count in (1, 60)
    }
    for count, process in processes.items():
        output = process.communicate(timeout=300)[0]
        assert process.returncode == 0, output[-3000:]
        (checkpoint,) = (tmp_path / f"run{count}").rglob("last.ckpt")
        words = torch.load(checkpoint, weights_only=True)["captioner"]["vocabulary"]["words"]
        prepared = [
            p
            for p in (work / "prepared").iterdir()
            if json.loads((p / "settings.json").read_text())["min_word_count"] == count
        ]
        assert json.loads((prepared[0] / "vocab.json").read_text())["words"] == words
