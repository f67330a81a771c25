import json

import pytest

from captioner.data.coco import CaptionRecord
from captioner.data.splits import SPLITS, prepare_splits, split_records
from captioner.errors import CaptionerError


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


def test_persisted_split_is_reused_and_a_changed_one_refused(tmp_path):
    path = tmp_path / "splits.json"
    records = make_records(50)
    made = prepare_splits(path, records, 5, 5, seed=0)
    saved = json.loads(path.read_text())
    assert saved["settings"]["seed"] == 0
    assert prepare_splits(path, records, 5, 5, seed=0) == made
    with pytest.raises(CaptionerError, match="seed"):
        prepare_splits(path, records, 5, 5, seed=1)
    with pytest.raises(CaptionerError, match="records"):
        prepare_splits(path, records[:-1], 5, 5, seed=0)
