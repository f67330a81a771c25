import json

import pytest

from captioner.data.coco import parse_coco_captions
from captioner.errors import CaptionerError


def write(path, payload):
    path.write_text(json.dumps(payload) if not isinstance(payload, str) else payload)
    return path


@pytest.fixture
def layout(tmp_path):
    images = tmp_path / "Images"
    images.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (images / name).write_bytes(b"x")
    (images / "empty.jpg").write_bytes(b"")
    return tmp_path, images


def test_joins_on_file_name_and_counts_every_skip(layout):
    root, images = layout
    payload = {
        "images": [
            {"id": 10, "file_name": "a.jpg"},
            {"id": 11, "file_name": "b.jpg"},
            {"id": 12, "file_name": "missing.jpg"},
            {"id": 13, "file_name": "c.jpg"},  # no captions
            {"id": 14, "file_name": "empty.jpg"},
            {"id": 10, "file_name": "dup.jpg"},  # duplicate id
        ],
        "annotations": [
            {"image_id": 10, "caption": "A dog runs."},
            {"image_id": 10, "caption": "A dog runs."},  # duplicate
            {"image_id": 10, "caption": "  a   brown dog "},
            {"image_id": 11, "caption": "Two cats"},
            {"image_id": 11, "caption": "   "},  # empty
            {"image_id": 12, "caption": "nobody sees this"},
            {"image_id": 14, "caption": "an empty file"},
            {"image_id": 99, "caption": "orphan caption"},
        ],
    }
    records, report = parse_coco_captions(write(root / "captions.json", payload), images)
    assert [(r.file_name, r.captions) for r in records] == [
        ("a.jpg", ("A dog runs.", "a brown dog")),
        ("b.jpg", ("Two cats",)),
    ]
    assert report.images == 2 and report.captions == 3
    assert report.missing_files == ["missing.jpg"]
    assert report.empty_files == ["empty.jpg"]
    assert report.images_without_captions == 1
    assert report.captions_without_images == 1
    assert report.empty_captions == 1
    assert report.duplicate_captions == 1
    assert report.duplicate_image_entries == 1
    summary = report.summary()
    assert "1 image files missing" in summary and "missing.jpg" in summary


def test_malformed_json_names_the_file(layout):
    root, images = layout
    path = write(root / "captions.json", '{"images": [')
    with pytest.raises(CaptionerError, match=r"captions\.json is not valid JSON"):
        parse_coco_captions(path, images)


@pytest.mark.parametrize(
    ("payload", "key"),
    [
        ({"annotations": []}, "'images'"),
        ({"images": [{"id": 1}], "annotations": []}, r"images\[0\], has no key 'file_name'"),
        (
            {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1}]},
            r"annotations\[0\], has no key 'caption'",
        ),
    ],
)
def test_missing_key_is_named(layout, payload, key):
    root, images = layout
    with pytest.raises(CaptionerError, match=key):
        parse_coco_captions(write(root / "captions.json", payload), images)


def test_nothing_usable_is_an_error(layout):
    root, images = layout
    payload = {"images": [{"id": 1, "file_name": "gone.jpg"}], "annotations": [{"image_id": 1, "caption": "x"}]}
    with pytest.raises(CaptionerError, match="No usable image"):
        parse_coco_captions(write(root / "captions.json", payload), images)
