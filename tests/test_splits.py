import pytest

from captioner.core.errors import CaptionerError
from captioner.data.formats.karpathy import Karpathy
from captioner.data.splits import SPLITS, label_from_split_file, make_splits, split_by_labels, split_records
from captioner.sources.records import CaptionRecord, DataReport
from tests.test_formats import karpathy_file


def make_records(n):
    return [CaptionRecord(f"img{i:04d}.jpg", (f"caption {i}",)) for i in range(n)]


def test_deterministic_disjoint_and_complete():
    records = make_records(300)
    first = split_records(records, 0.1, 30, seed=3)
    again = split_records(list(reversed(records)), 0.1, 30, seed=3)
    other = split_records(records, 0.1, 30, seed=4)
    assert first == again
    assert first != other
    names = {name: {r.file_name for r in first[name]} for name in SPLITS}
    assert len(names["val"]) == 30 and len(names["test"]) == 30 and len(names["train"]) == 240
    assert not names["train"] & names["val"] and not names["train"] & names["test"] and not names["val"] & names["test"]
    assert names["train"] | names["val"] | names["test"] == {r.file_name for r in records}


def test_fractions_work_for_small_sets():
    parts = split_records(make_records(7), 0.1, 0.1, seed=0)
    assert [len(parts[name]) for name in SPLITS] == [5, 1, 1]


def test_sizes_that_leave_no_training_data_are_refused():
    with pytest.raises(CaptionerError, match="leave no training image"):
        split_records(make_records(10), 5, 5, seed=0)


def labelled(labels):
    return [CaptionRecord(f"{i}.jpg", ("x",), i, label) for i, label in enumerate(labels)]


def test_labels_decide_the_splits_and_restval_joins_train_or_is_dropped():
    records = labelled(["train", "val", "test", "restval", "restval", "train"])
    splits = make_splits(records, 0.5, 0.5, seed=0)  # sizes and seed are ignored when every record has a label
    assert [[r.file_name for r in splits[n]] for n in SPLITS] == [
        ["0.jpg", "3.jpg", "4.jpg", "5.jpg"],
        ["1.jpg"],
        ["2.jpg"],
    ]
    dropped = split_by_labels(records, restval="drop")
    assert [r.file_name for r in dropped["train"]] == ["0.jpg", "5.jpg"]
    with pytest.raises(CaptionerError, match="leave the val split empty"):
        split_by_labels(labelled(["train", "test"]))


def test_a_split_file_labels_the_data_by_file_name_and_counts_both_kinds_of_mismatch(tmp_path):
    records = [
        CaptionRecord(name, ("x",))
        for name in ("Images/a.jpg", "Images/b.jpg", "Images/c.jpg", "Images/d.jpg", "Images/extra.jpg")
    ]
    report = DataReport()
    out = label_from_split_file(records, karpathy_file(tmp_path), report)
    expected = [
        ("Images/a.jpg", "train"),
        ("Images/b.jpg", "val"),
        ("Images/c.jpg", "test"),
        ("Images/d.jpg", "restval"),
    ]
    assert [(r.file_name, r.split) for r in out] == expected
    assert report.skipped["images the split file does not name (left out)"] == 1
    assert report.skipped["images the split file names that the data lacks"] == 2  # e.jpg and gone.jpg
    with pytest.raises(CaptionerError, match="names none of the data's images"):
        label_from_split_file([CaptionRecord("zzz.jpg", ("x",))], tmp_path / "dataset_coco.json", DataReport())
    assert Karpathy().locate(tmp_path) == tmp_path / "dataset_coco.json"
