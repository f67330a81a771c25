"""Every caption format on files the tests write, with every oddity people's files have."""

import csv
import json
from pathlib import Path

import pytest

from captioner.core.errors import CaptionerError
from captioner.data.download import read_caption_set
from captioner.data.formats import Coco, Csv, Jsonl, Karpathy, TextFolder
from captioner.sources.records import DataReport


def write(path: Path, payload) -> Path:
    path.write_text(json.dumps(payload) if not isinstance(payload, str) else payload, encoding="utf-8")
    return path


@pytest.fixture
def layout(tmp_path):
    images = tmp_path / "Images"
    images.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (images / name).write_bytes(b"x")
    (images / "empty.jpg").write_bytes(b"")
    return tmp_path, images


# ---------------------------------------------------------------- COCO
def test_coco_joins_on_file_name_and_counts_every_skip(layout):
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
    report = DataReport()
    records, images_dir = Coco().read(write(root / "captions.json", payload), report)
    assert images_dir == images
    assert [(r.file_name, r.captions, r.image_id) for r in records] == [
        ("a.jpg", ("A dog runs.", "a brown dog"), 10),
        ("b.jpg", ("Two cats",), 11),
    ]
    assert report.images == 2 and report.captions == 3
    assert dict(report.skipped) == {
        "image files missing": 1,
        "image files empty (0 bytes)": 1,
        "images without captions": 1,
        "captions whose image_id matches no image": 1,
        "empty captions": 1,
        "duplicate captions": 1,
        "duplicate image entries": 1,
    }
    summary = report.summary()
    assert "1 image files missing" in summary and "missing.jpg" in summary


def test_coco_malformed_json_names_the_file(layout):
    root, _ = layout
    with pytest.raises(CaptionerError, match=r"captions\.json is not valid JSON"):
        Coco().read(write(root / "captions.json", '{"images": ['), DataReport())


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
def test_coco_missing_key_is_named(layout, payload, key):
    root, _ = layout
    with pytest.raises(CaptionerError, match=key):
        Coco().read(write(root / "captions.json", payload), DataReport())


def test_nothing_usable_is_an_error(layout):
    root, _ = layout
    payload = {"images": [{"id": 1, "file_name": "gone.jpg"}], "annotations": [{"image_id": 1, "caption": "x"}]}
    with pytest.raises(CaptionerError, match="No usable image"):
        Coco().read(write(root / "captions.json", payload), DataReport())


# ---------------------------------------------------------------- Karpathy
def karpathy_file(root: Path) -> Path:
    entries = [
        {
            "filename": "a.jpg",
            "filepath": "train2014",
            "split": "train",
            "cocoid": 1,
            "sentences": [{"raw": "A Dog, running!"}, {"raw": "a dog"}],
        },
        {"filename": "b.jpg", "filepath": "val2014", "split": "val", "cocoid": 2, "sentences": [{"raw": "Two cats."}]},
        {"filename": "c.jpg", "filepath": "val2014", "split": "test", "cocoid": 3, "sentences": [{"raw": "A car"}]},
        {"filename": "d.jpg", "filepath": "val2014", "split": "restval", "cocoid": 4, "sentences": [{"raw": "A boat"}]},
        {"filename": "e.jpg", "filepath": "val2014", "split": "train", "cocoid": 5, "sentences": []},
        {"filename": "gone.jpg", "filepath": "val2014", "split": "test", "cocoid": 6, "sentences": [{"raw": "x"}]},
    ]
    return write(root / "dataset_coco.json", {"images": entries, "dataset": "coco"})


def test_karpathy_file_gives_captions_ids_and_splits_and_counts_what_is_missing(tmp_path):
    for folder, names in (("train2014", ["a.jpg"]), ("val2014", ["b.jpg", "c.jpg", "d.jpg", "e.jpg"])):
        (tmp_path / folder).mkdir()
        for name in names:
            (tmp_path / folder / name).write_bytes(b"x")
    report = DataReport()
    records, images_dir = Karpathy().read(karpathy_file(tmp_path), report)
    assert images_dir == tmp_path
    assert [(r.file_name, r.split, r.image_id) for r in records] == [
        ("train2014/a.jpg", "train", 1),
        ("val2014/b.jpg", "val", 2),
        ("val2014/c.jpg", "test", 3),
        ("val2014/d.jpg", "restval", 4),
    ]
    assert records[0].captions == ("A Dog, running!", "a dog")  # raw, as written
    assert report.skipped["image files missing"] == 1 and report.skipped["images with an empty sentence list"] == 1


def test_karpathy_file_finds_images_in_a_flat_copy(tmp_path):
    (tmp_path / "Images").mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (tmp_path / "Images" / name).write_bytes(b"x")
    records, images_dir = Karpathy().read(karpathy_file(tmp_path), DataReport())
    assert images_dir == tmp_path / "Images" and [r.file_name for r in records] == ["a.jpg", "b.jpg", "c.jpg"]


# ---------------------------------------------------------------- CSV / TSV
def test_csv_handles_what_real_files_hold(tmp_path):
    for name in ("a.jpg", "b.jpg", "sub/c.jpg", "with space.jpg"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    absolute = tmp_path / "sub" / "c.jpg"
    text = (
        "\ufeffimage,caption\r\n"  # UTF-8 with a byte-order mark, Windows line ends
        'a.jpg,"A dog, with a ""hat"""\r\n'  # quotes and commas inside a field
        'a.jpg,"a caption\r\non two lines"\r\n'  # a line break inside a field
        "\r\n"  # a blank line
        "b.jpg,Un café à Paris 🐈\r\n"  # Unicode
        "b.jpg,Un café à Paris 🐈\r\n"  # a duplicate row
        "c_missing.jpg,no such picture\r\n"
        "with space.jpg,\r\n"  # listed with no caption
        f"{absolute},an absolute path\r\n"
        "a.jpg,too,many,fields\r\n"
    )
    (tmp_path / "captions.csv").write_bytes(text.encode("utf-8"))
    folder_format, source = Csv(), Csv().locate(tmp_path)
    report = DataReport()
    records, images_dir = folder_format.read(source, report)
    assert images_dir == tmp_path
    assert {r.file_name: r.captions for r in records} == {
        "a.jpg": ('A dog, with a "hat"', "a caption on two lines"),
        "b.jpg": ("Un café à Paris 🐈",),
        "sub/c.jpg": ("an absolute path",),
    }
    assert dict(report.skipped) == {
        "duplicate captions": 1,
        "image files missing": 1,
        "empty captions": 1,
        "images without captions": 1,
        "rows with 4 fields instead of 2": 1,
    }
    assert "line 11" in report.summary()  # where the malformed row was


def test_tsv_and_other_column_names(tmp_path):
    (tmp_path / "x.png").write_bytes(b"x")
    (tmp_path / "data.tsv").write_text("file\ttext\nx.png\ta picture, with a comma\n", encoding="utf-8")
    records, _ = Csv(image_column="file", caption_column="text").read(tmp_path / "data.tsv", DataReport())
    assert records[0].captions == ("a picture, with a comma",)
    with pytest.raises(CaptionerError, match=r"data.tsv, line 1: no column 'image' or 'caption'"):
        Csv().read(tmp_path / "data.tsv", DataReport())


def test_a_csv_that_cannot_be_parsed_stops_with_the_file_line_and_reason(tmp_path):
    (tmp_path / "bad.csv").write_text('image,caption\na.jpg,"never closed\n', encoding="utf-8")
    with pytest.raises(CaptionerError, match=r"bad.csv, line \d+: cannot be parsed as CSV"):
        Csv().read(tmp_path / "bad.csv", DataReport())
    (tmp_path / "latin.csv").write_bytes("image,caption\na.jpg,caf\xe9\n".encode("latin-1"))
    with pytest.raises(CaptionerError, match="latin.csv is not UTF-8"):
        Csv().read(tmp_path / "latin.csv", DataReport())


# ---------------------------------------------------------------- JSON Lines
def test_jsonl_lines_lists_and_bad_lines(tmp_path):
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / name).write_bytes(b"x")
    lines = [
        json.dumps({"image": "a.jpg", "caption": "first"}),
        "",
        json.dumps({"image": "a.jpg", "caption": "first"}),
        json.dumps({"image": "b.jpg", "caption": ["one", "two", ""]}),
        "{not json",
        json.dumps({"image": "b.jpg"}),
        json.dumps({"image": "gone.jpg", "caption": "x"}),
    ]
    (tmp_path / "data.jsonl").write_text("\r\n".join(lines) + "\r\n", encoding="utf-8-sig")
    report = DataReport()
    records, _ = Jsonl().read(tmp_path / "data.jsonl", report)
    assert {r.file_name: r.captions for r in records} == {"a.jpg": ("first",), "b.jpg": ("one", "two")}
    assert dict(report.skipped) == {
        "duplicate captions": 1,
        "empty captions": 1,
        "image files missing": 1,
        "lines that are not an object with an image and a caption": 2,
    }
    (tmp_path / "broken.jsonl").write_text("{not json\n[1, 2]\n", encoding="utf-8")
    with pytest.raises(CaptionerError, match=r"broken.jsonl holds no readable line \(line 1: "):
        Jsonl().read(tmp_path / "broken.jsonl", DataReport())


# ---------------------------------------------------------------- folder with .txt beside the pictures
def test_text_folder_reads_one_caption_per_non_empty_line(tmp_path):
    (tmp_path / "nested").mkdir()
    for name in ("cat.jpg", "nested/dog.png", "lonely.jpg", "blank.jpg"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "cat.txt").write_text("\ufeffA cat.\r\n\r\nA cat on a mat\n", encoding="utf-8")
    (tmp_path / "nested" / "dog.txt").write_text("a dog", encoding="utf-8")
    (tmp_path / "blank.txt").write_text("\n \n", encoding="utf-8")
    report = DataReport()
    records, images_dir = TextFolder().read(TextFolder().locate(tmp_path), report)
    assert {r.file_name: r.captions for r in records} == {
        "cat.jpg": ("A cat.", "A cat on a mat"),
        "nested/dog.png": ("a dog",),
    }
    assert dict(report.skipped) == {"pictures without a .txt file": 1, "images without captions": 1}


# ---------------------------------------------------------------- finding the format
def test_the_format_is_found_from_what_the_folder_holds_and_nothing_known_is_one_clear_error(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    with pytest.raises(CaptionerError) as caught:
        read_caption_set(tmp_path)
    message = str(caught.value)
    for looked_for in ("captions.json", "dataset_*.json", "*.csv", "*.jsonl", ".txt file"):
        assert looked_for in message
    (tmp_path / "a.txt").write_text("a caption", encoding="utf-8")
    assert type(read_caption_set(tmp_path)[2]).__name__ == "TextFolder"
    with (tmp_path / "list.csv").open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([["image", "caption"], ["a.jpg", "from the csv"]])
    records, _, found, _ = read_caption_set(tmp_path)
    assert type(found).__name__ == "Csv" and records[0].captions == ("from the csv",)  # a caption file wins
    (tmp_path / "other.csv").write_text("image,caption\n", encoding="utf-8")
    with pytest.raises(CaptionerError, match="several CSV/TSV files"):
        read_caption_set(tmp_path)


# ---------------------------------------------------------------- the same scenes in every format: the same model
def write_in_format(scenes: Path, folder: Path, kind: str) -> Path:
    """The scenes' images and captions written as `kind`, images in `folder/Images` (or beside their .txt)."""
    payload = json.loads((scenes / "captions.json").read_text())
    name_of = {image["id"]: image["file_name"] for image in payload["images"]}
    pairs = [(name_of[a["image_id"]], a["caption"]) for a in payload["annotations"]]
    folder.mkdir()
    if kind == "folder":
        for name in name_of.values():
            (folder / name).write_bytes((scenes / "Images" / name).read_bytes())
        for name in name_of.values():
            lines = [caption for image, caption in pairs if image == name]
            (folder / name).with_suffix(".txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return folder
    (folder / "Images").symlink_to(scenes / "Images")
    if kind == "csv":
        with (folder / "captions.csv").open("w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows([["image", "caption"], *[[f"Images/{n}", c] for n, c in pairs]])
    else:
        lines = [json.dumps({"image": f"Images/{n}", "caption": c}) for n, c in pairs]
        (folder / "captions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def test_each_format_gives_the_records_splits_and_vocabulary_the_coco_file_gives(scenes_source, tmp_path):
    """Nothing after the records knows the format: equal records (the same pictures with the same captions) give
    the same splits and vocabulary, hence the same features and the same model."""
    from captioner.data.splits import make_splits
    from captioner.text.words import Vocabulary

    def prepared(root: Path) -> tuple[dict, dict, list[str]]:
        records, images_dir, _, report = read_caption_set(root)
        assert not report.skipped
        by_picture = {(images_dir / r.file_name).read_bytes(): tuple(sorted(r.captions)) for r in records}
        splits = make_splits(records, 20, 20, 0, "train")
        names = {split: sorted((images_dir / r.file_name).name for r in part) for split, part in splits.items()}
        vocabulary = Vocabulary.build([c for r in splits["train"] for c in r.captions], min_count=1, max_length=34)
        return by_picture, names, vocabulary.itos

    coco = prepared(scenes_source)
    assert len(coco[0]) == 120 and {len(v) for v in coco[1].values()} == {80, 20}
    for kind in ("csv", "jsonl", "folder"):
        assert prepared(write_in_format(scenes_source, tmp_path / kind, kind)) == coco, kind


def test_a_folder_without_a_caption_set_is_one_clear_error_even_with_scene_generation_on(tmp_path, capsys):
    from captioner.cli import main
    from tests.conftest import tiny_args

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my notes")
    with pytest.raises(SystemExit) as exit_info:
        main(tiny_args("fit", tmp_path / "mine", tmp_path / "work", tmp_path, "--data.origin.synthetic_images", "50"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "holds no caption set" in err and "captions.json" in err
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
