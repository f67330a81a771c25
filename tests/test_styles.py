"""Caption styles (`captioner.text.styles`): one model trained on short captions, long ones and tags writes each as it
is asked, through every entry point; the formats read styles; a model without styles refuses one in one line."""

import asyncio
import base64
import csv
import io
import json
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi import HTTPException

from captioner import Captioner
from captioner.core.errors import CaptionerError
from captioner.data.splits import load_splits, save_splits
from captioner.data.synthetic import write_synthetic_dataset
from captioner.sources.records import DataReport
from captioner.text.styles import plain_caption, styled_text
from tests.conftest import copy_scenes, tiny_args

STYLES = ("short", "long", "tags")


@pytest.fixture(scope="module")
def styled(tmp_path_factory) -> SimpleNamespace:
    """A tiny model trained on 240 scenes captioned in three styles, and its test report."""
    from captioner.cli import main

    root = tmp_path_factory.mktemp("styled")
    scenes = write_synthetic_dataset(root / "scenes", 240, seed=1, styles=True)
    extra = ("--data.captions.min_word_count", "1")
    fitted = main(tiny_args("fit", scenes, root / "work", root, "--trainer.max_epochs", "6", *extra))
    checkpoint = Path(fitted.trainer.checkpoint_callback.best_model_path)
    tested = main(tiny_args("test", scenes, root / "work", root, "--ckpt_path", str(checkpoint), *extra))
    (splits_file,) = (root / "work" / "prepared").glob("*/splits.json")
    test_records = load_splits(splits_file)[0]["test"]
    return SimpleNamespace(
        root=root,
        scenes=scenes,
        checkpoint=checkpoint,
        report=tested.model.test_results["report"],
        test_records=test_records,
        captioner=Captioner.from_checkpoint(checkpoint, device="cpu"),
    )


def test_each_style_scores_best_against_its_own_references_on_held_out_scenes(styled, monkeypatch):
    """`test` scores each style against its own references (CHAIR on each); asked for another style, the same model
    scores far lower against those references: the style conditions what it writes."""
    from captioner.evaluation.metrics import coco_caption_scores

    monkeypatch.setenv("CAPTIONER_JAVA", "0")  # the pure-Python tokenizer: nine scorings in a second
    report = styled.report["styles"]
    assert tuple(report) == STYLES and styled.captioner.limits.styles == STYLES
    for style in STYLES:
        assert report[style]["scores"]["CIDEr"] > 50 and report[style]["chair"]["CHAIR-i"] < 60, style
    images = [styled.scenes / "Images" / record.file_name for record in styled.test_records]
    written = {style: styled.captioner.caption(images, style=style) for style in STYLES}
    for style in STYLES:
        references = {
            str(i): [c for j, c in enumerate(r.captions) if r.styles[j] == style]
            for i, r in enumerate(styled.test_records)
        }
        cider = {
            asked: coco_caption_scores(dict(zip(references, written[asked])), references)["scores"]["CIDEr"]
            for asked in STYLES
        }
        for other in STYLES:
            if other != style:
                assert cider[style] > cider[other] + 30, (style, cider)  # the baseline: another style, same model
    assert all(", " in caption for caption in written["tags"])  # tags come back with their commas
    mean_words = {style: sum(len(c.split()) for c in written[style]) / len(images) for style in STYLES}
    assert mean_words["short"] < 5 < mean_words["long"]
    assert written["short"] == styled.captioner.caption(images)  # the default style is the first met: short


def test_a_style_is_chosen_the_same_way_in_caption_the_exported_runtime_and_the_server(styled, tmp_path, capsys):
    from captioner.cli import main
    from captioner.export.onnx import export_onnx
    from captioner.inference.exported import OnnxCaptioner
    from captioner.models.module import CaptionModel
    from captioner.serve.api import CaptionAPI

    images = sorted((styled.scenes / "Images").iterdir())[:6]
    expected = {style: styled.captioner.caption(images, style=style) for style in STYLES}
    main(["caption", *map(str, images[:2]), "--ckpt_path", str(styled.checkpoint), "--style", "tags", "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [row["caption"] for row in rows] == expected["tags"][:2]

    exported = OnnxCaptioner(export_onnx(CaptionModel.from_checkpoint(str(styled.checkpoint)), tmp_path / "onnx"))
    assert exported.limits.styles == STYLES
    for style in STYLES:
        assert exported.caption(images, style=style) == expected[style], style

    api = CaptionAPI(styled.checkpoint)
    api.attach(styled.captioner)
    data = base64.b64encode(images[0].read_bytes()).decode()

    def served(request: dict) -> str:
        async def one() -> dict:
            decoded = await api.decode_request(request)
            (output,) = api.caption_batch([decoded])
            return await api.encode_response(output)

        answer = asyncio.run(one())
        return answer["caption"] if "caption" in answer else answer["choices"][0]["message"]["content"]

    assert served({"image": data, "style": "long"}) == expected["long"][0]
    url = f"data:image/jpeg;base64,{data}"
    chat = {
        "model": "m",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Tags for this picture, please."},
                    {"type": "image_url", "image_url": {"url": url}},
                ],
            }
        ],
    }
    assert served(chat) == expected["tags"][0]  # the message's text named a style
    with pytest.raises(HTTPException, match="not one of this model's styles: short, long, tags"):
        served({"image": data, "style": "poem"})


def test_caption_set_writes_every_style_asked_for_as_their_users_read_them(styled, tmp_path, capsys):
    import pandas as pd

    from captioner.bulk.command import caption_set_command

    photos = copy_scenes(styled.scenes, tmp_path / "photos", 5)
    images = sorted(photos.glob("*.jpg"))
    short, tags = styled.captioner.caption(images, style="short"), styled.captioner.caption(images, style="tags")
    caption_set_command(
        ["--ckpt_path", str(styled.checkpoint), "--input", str(photos), "--styles", "tags,short", "--format", "txt"]
    )
    for image, one, other in zip(images, tags, short):
        # sd-scripts reads a multi-line .txt as one caption per line and picks one line per epoch
        assert image.with_suffix(".txt").read_text(encoding="utf-8").splitlines() == [one, other]
    out = tmp_path / "parquet"
    caption_set_command(
        [
            "--ckpt_path",
            str(styled.checkpoint),
            "--input",
            str(photos),
            "--styles",
            "short,tags",
            "--format",
            "parquet",
            "--output",
            str(out),
        ]
    )
    table = pd.concat([pd.read_parquet(path) for path in sorted(out.glob("*.parquet"))]).sort_values("image")
    assert list(table["caption"]) == short and list(table["caption_short"]) == short
    assert list(table["caption_tags"]) == tags
    capsys.readouterr()
    with pytest.raises(SystemExit):
        from captioner.cli import main

        main(
            [
                "caption-set",
                "--ckpt_path",
                str(styled.checkpoint),
                "--input",
                str(photos),
                "--styles",
                "poem",
                "--format",
                "txt",
                "--overwrite",
            ]
        )
    assert "not one of this model's styles: short, long, tags" in capsys.readouterr().err


def test_every_caption_format_reads_styles_and_the_splits_file_keeps_them(tmp_path):
    from captioner.data.formats import Coco, Csv, Jsonl, TextFolder, WebDataset

    picture = tmp_path / "a.jpg"
    copy = write_synthetic_dataset(tmp_path / "one", 1, styles=True)
    picture.write_bytes(next((copy / "Images").iterdir()).read_bytes())
    (tmp_path / "a.txt").write_text("a red circle\n")
    (tmp_path / "a.tags.txt").write_text("red, circle\nred, circle, left\n")
    (tmp_path / "a.Not-A-Style.txt").write_text("ignored\n")

    def read(caption_format, source):
        records, _ = caption_format.read(source, DataReport())
        return [(record.file_name, list(zip(record.styles, record.captions))) for record in records]

    folder = read(TextFolder(), tmp_path)
    assert folder == [("a.jpg", [(None, "a red circle"), ("tags", "red, circle"), ("tags", "red, circle, left")])]
    with (tmp_path / "c.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(
            [["image", "caption", "style"], ["a.jpg", "a red circle", ""], ["a.jpg", "red, circle", "tags"]]
        )
    assert read(Csv(), tmp_path / "c.csv") == [("a.jpg", [(None, "a red circle"), ("tags", "red, circle")])]
    (tmp_path / "c.jsonl").write_text(
        json.dumps({"image": "a.jpg", "caption": ["red, circle"], "style": "tags"})
        + "\n"
        + json.dumps({"image": "a.jpg", "caption": "a red circle", "style": "BAD STYLE"})
        + "\n"
    )
    report = DataReport()
    records, _ = Jsonl().read(tmp_path / "c.jsonl", report)
    assert records[0].styles == ("tags",) and report.skipped["captions whose style is not lowercase letters and digits"]
    coco = read(Coco(), copy / "captions.json")[0][1]
    assert [style for style, _ in coco] == ["short", "short", "long", "long", "tags", "tags"]
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "00000.tar", "w") as tar:
        for name, data in (("k.jpg", picture.read_bytes()), ("k.txt", b"a red circle"), ("k.tags.txt", b"red, circle")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    ((_, shard_records),) = WebDataset().shard_records(shards, DataReport())
    assert list(zip(shard_records[0].styles, shard_records[0].captions)) == [
        (None, "a red circle"),
        ("tags", "red, circle"),
    ]
    records, _ = Coco().read(copy / "captions.json", DataReport())
    save_splits(tmp_path / "splits.json", {"train": records, "val": [], "test": []}, {})
    assert load_splits(tmp_path / "splits.json")[0]["train"][0].styles == records[0].styles
    entries = json.loads((tmp_path / "splits.json").read_text())
    entries["splits"]["train"][0][3][0] = "Bad Style"
    (tmp_path / "splits.json").write_text(json.dumps(entries))
    with pytest.raises(CaptionerError, match="malformed"):
        load_splits(tmp_path / "splits.json")


def test_a_model_without_styles_decodes_as_before_and_refuses_a_style_in_one_line():
    from captioner.decoding.config import DecodingConfig, ModelLimits
    from captioner.text import Vocabulary, tokenizer_from_dict, tokenizer_to_dict

    plain = Vocabulary.build(["a red circle", "a blue square"], min_count=1)
    assert "styles" not in tokenizer_to_dict(plain)  # its checkpoints and exports hold what they held before
    limits = ModelLimits(len(plain), plain.max_length, tokenizer=plain)
    with pytest.raises(CaptionerError, match="trained without caption styles"):
        DecodingConfig(style="tags").checked(limits)
    assert plain.decode(plain.encode("a red circle")) == "a red circle"
    texts = [styled_text("red, circle", "tags")] * 5 + [styled_text("a red circle", "short")]
    styled = Vocabulary.build(texts, min_count=5)
    styled.styles = ("tags", "short")
    again = tokenizer_from_dict(tokenizer_to_dict(styled))
    assert again.styles == ("tags", "short") and "xxstyleshort" in again.stoi  # a marker seen once is kept
    assert "a" not in again.stoi
    assert again.decode(again.encode(styled_text("red, circle", "tags"))) == "red, circle"
    assert plain_caption("a caption, with a comma") == "a caption, with a comma"
