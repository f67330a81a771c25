import csv
import json
import shutil

import pytest
import torch
from PIL import Image

from captioner import Captioner, CaptionerError
from captioner.cli import main
from captioner.encoders.preprocessing import Preprocessing
from captioner.runs import run_dir
from tests.conftest import TINY_CONFIG, predict_args


def write_every_kind_of_image(folder, source):
    """Every supported format and PIL mode, plus files that cannot be read."""
    base = Image.open(source).convert("RGB")
    (folder / "nested" / "deeper").mkdir(parents=True)
    base.save(folder / "rgb.jpg")
    base.convert("L").save(folder / "gray.jpg")
    base.convert("CMYK").save(folder / "cmyk.jpg")
    base.convert("RGBA").save(folder / "alpha.png")
    base.convert("LA").save(folder / "gray_alpha.png")
    palette = base.convert("P", palette=Image.Palette.ADAPTIVE)
    palette.info["transparency"] = 0
    palette.save(folder / "palette.png", transparency=0)
    base.convert("I;16").save(folder / "nested" / "sixteen_bit.png")
    base.save(folder / "nested" / "picture.BMP")
    base.save(folder / "nested" / "deeper" / "picture.webp")
    frames = [base, base.rotate(90)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:])
    good = 10
    (folder / "not_an_image.jpg").write_text("hello")
    (folder / "empty.png").write_bytes(b"")
    data = (folder / "rgb.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "notes.txt").write_text("ignored: not an image extension")
    return good, 3


def test_predict_writes_every_file_once_with_errors_and_pictures(trained, scenes_source, tmp_path, capsys):
    checkpoint, _ = trained
    photos = tmp_path / "photos"
    photos.mkdir()
    good, bad = write_every_kind_of_image(photos, next((scenes_source / "Images").iterdir()))
    extra = [
        "--predictions.write_images",
        "true",
        "--data.data_dir",
        str(tmp_path / "no-dataset-here"),
        "--data.work_dir",
        str(tmp_path / "no-work-dir"),
    ]
    cli = main(predict_args(checkpoint, photos, tmp_path / "runs", *extra))
    assert f"{good} captioned, {bad} failed" in capsys.readouterr().out
    folder = run_dir(cli.trainer)
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == good + bad and len({r["image"] for r in rows}) == len(rows)
    by_name = {r["image"].rsplit("/", 1)[-1]: r for r in rows}
    for name in ("not_an_image.jpg", "empty.png", "truncated.jpg"):
        assert by_name[name]["caption"] is None and by_name[name]["error"]
    for name in (
        "rgb.jpg",
        "gray.jpg",
        "cmyk.jpg",
        "alpha.png",
        "gray_alpha.png",
        "palette.png",
        "sixteen_bit.png",
        "picture.BMP",
        "picture.webp",
        "animated.gif",
    ):
        row = by_name[name]
        assert row["error"] is None and row["caption"] and row["score"] < 0
        assert not any(token in row["caption"] for token in ("<start>", "<end>", "<pad>", "<unk>"))
    with (folder / "predictions.csv").open(newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [r["image"] for r in table] == [r["image"] for r in rows]
    # Every row field but the alternatives (a list, in predictions.jsonl); a confidence: calibrated on validation.
    assert tuple(table[0]) == ("image", "caption", "score", "confidence", "constraints_met", "clip_score", "error")
    assert all(0 <= float(r["confidence"]) <= 1 for r in table if not r["error"])
    pictures = sorted((folder / "captioned").rglob("*.png"))
    assert len(pictures) == good
    assert (folder / "captioned" / "nested" / "deeper" / "picture.webp.png") in pictures
    with Image.open(pictures[0]) as picture:
        assert picture.width == 512 and picture.height > 512 * 120 / 160  # the caption band is under the image
    assert not list(folder.glob(".predictions.*"))
    assert not (tmp_path / "no-dataset-here").exists() and not (tmp_path / "no-work-dir").exists()


@pytest.mark.parametrize("folder", ["empty", "missing"])
def test_predict_on_an_empty_or_missing_folder_is_a_clear_error(trained, tmp_path, folder, capsys):
    checkpoint, _ = trained
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(predict_args(checkpoint, tmp_path / folder, tmp_path / "runs"))
    assert exit_info.value.code == 2
    assert "--data.predict_dir" in capsys.readouterr().err


def test_captioner_api_takes_paths_pil_images_and_tensors(trained, scenes_source, tmp_path):
    checkpoint, _ = trained
    captioner = Captioner.from_checkpoint(checkpoint, device="cpu", batch_size=2)
    source = sorted((scenes_source / "Images").iterdir())[:3]
    pngs = []
    for index, path in enumerate(source):
        pngs.append(tmp_path / f"{index}.png")
        Image.open(path).save(pngs[-1])
    from_paths = captioner.caption(pngs)
    from_pil = captioner.caption([Image.open(p) for p in pngs])
    from_tensors = captioner.caption([Preprocessing(32).from_file(p) for p in pngs])
    assert from_paths == from_pil == from_tensors
    assert captioner.caption(pngs[0]) == from_paths[:1]
    assert captioner.caption(torch.stack([Preprocessing(32).from_file(p) for p in pngs])) == from_paths
    assert all(isinstance(c, str) and c for c in from_paths)
    (tmp_path / "bad.png").write_text("nope")
    with pytest.raises(CaptionerError, match="bad.png"):
        captioner.caption([pngs[0], tmp_path / "bad.png"])
    predictions = captioner.predict([pngs[0], tmp_path / "bad.png"])
    assert predictions[0].caption == from_paths[0] and predictions[1].error


def test_caption_command_prints_captions_and_counts_failures(trained, scenes_source, tmp_path, capsys):
    checkpoint, _ = trained
    image = next((scenes_source / "Images").iterdir())
    (tmp_path / "bad.jpg").write_text("nope")
    with pytest.raises(SystemExit) as exit_info:
        main(["caption", str(image), str(tmp_path / "bad.jpg"), "--ckpt_path", str(checkpoint), "--device", "cpu"])
    assert exit_info.value.code == 1
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    assert lines[0].startswith(f"{image}: ") and len(lines[0]) > len(str(image)) + 4
    assert lines[1].startswith(f"{tmp_path / 'bad.jpg'}: ERROR")
    assert "1 captioned, 1 failed" in out.err


def test_caption_command_takes_folders_captioning_every_image_under_them(trained, scenes_source, tmp_path, capsys):
    checkpoint, _ = trained
    images = sorted((scenes_source / "Images").iterdir())[:3]
    photos, empty = tmp_path / "photos", tmp_path / "empty"
    (photos / "sub").mkdir(parents=True)
    empty.mkdir()
    for image, place in zip(images, ["a.jpg", "b.jpg", "sub/c.jpg"]):
        shutil.copy(image, photos / place)
    (photos / "notes.txt").write_text("not an image: left out of a folder")
    (photos / "elsewhere").symlink_to(photos / "sub", target_is_directory=True)  # not followed, and said so
    with pytest.raises(SystemExit) as exit_info:
        main(["caption", str(photos), str(empty), "--ckpt_path", str(checkpoint), "--device", "cpu", "--json"])
    assert exit_info.value.code == 1  # the empty folder
    out = capsys.readouterr()
    rows = [json.loads(line) for line in out.out.strip().splitlines()]
    found = [str(photos / "a.jpg"), str(photos / "b.jpg"), str(photos / "sub" / "c.jpg")]
    assert [row["image"] for row in rows] == [*found, str(empty)]
    expected = Captioner.from_checkpoint(checkpoint, device="cpu").caption(images)
    assert [row["caption"] for row in rows[:3]] == expected and all(row["error"] is None for row in rows[:3])
    assert rows[3]["caption"] is None and "no image files" in rows[3]["error"]
    assert "3 captioned, 1 failed" in out.err
    assert f"1 symbolic links were not followed under {photos}" in out.err


def test_caption_command_prints_the_ranked_alternatives_and_json_a_script_reads(trained, scenes_source, capsys):
    checkpoint, _ = trained
    images = sorted((scenes_source / "Images").iterdir())[:2]
    expected = Captioner.from_checkpoint(checkpoint, device="cpu").describe(
        [Image.open(path) for path in images], num_beams=3, num_return=3
    )
    main(["caption", *map(str, images), "--ckpt_path", str(checkpoint), "--device", "cpu", "--num_return", "3"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == f"{images[0]}:" and lines[4] == f"{images[1]}:" and len(lines) == 8
    for block, row in ((lines[1:4], expected[0]), (lines[5:8], expected[1])):
        assert [line.split(". ", 1)[1].rsplit("  (", 1)[0] for line in block] == [
            a["caption"] for a in row["alternatives"]
        ]
    main(
        [
            "caption",
            *map(str, images),
            "--ckpt_path",
            str(checkpoint),
            "--device",
            "cpu",
            "--num_return",
            "3",
            "--force_words",
            "circle|square|triangle",
            "--json",
        ]
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [row["image"] for row in rows] == list(map(str, images)) and all(row["error"] is None for row in rows)
    for row in rows:
        assert len(row["alternatives"]) == 3 and row["caption"] == row["alternatives"][0]["caption"]
        for alternative in row["alternatives"]:
            assert alternative["constraints_met"] and {"circle", "square", "triangle"} & set(
                alternative["caption"].split()
            )


def test_checkpoint_carries_the_encoder_weights(scenes_source, tmp_path, monkeypatch):
    """Train with 'pretrained' weights from a local file, then caption with that file gone."""
    from torchvision.models import ResNet18_Weights, resnet18

    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    fake = resnet18().state_dict()
    fake["conv1.weight"].fill_(0.01)
    torch.save(fake, hub / ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cli = main(
        [
            "fit",
            "--config",
            str(TINY_CONFIG),
            "--data.data_dir",
            str(scenes_source),
            "--data.work_dir",
            str(tmp_path / "work"),
            "--model.encoder.weights",
            "IMAGENET1K_V1",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.logger",
            "false",
            "--trainer.max_epochs",
            "1",
        ]
    )
    checkpoint = cli.trainer.checkpoint_callback.best_model_path
    shutil.rmtree(tmp_path / "torch")  # no weights file and no network from here on
    captioner = Captioner.from_checkpoint(checkpoint, device="cpu")
    assert torch.all(captioner.model.encoder.net.conv1.weight == 0.01)
    assert captioner.caption(next((scenes_source / "Images").iterdir()))[0]


def test_reranking_by_clip_score_returns_the_alternative_clip_prefers(trained, scenes_source, tmp_path, capsys):
    """The beam's alternatives reordered by CLIP-S (LAION-COCO's recipe), each CLIP-S equal to a hand computation
    with the random small CLIP's own towers on the encoder's pixels brought to CLIP's input; the exported runtime
    refuses it in one line."""
    import numpy as np
    import torchvision.transforms.v2.functional as TF
    import transformers

    from captioner.evaluation.clip_score import PROMPT, write_random_clip
    from captioner.inference import load_captioner

    checkpoint, _ = trained
    words = "a an the red blue green yellow circle square triangle on left right of small large photo depicts"
    clip_folder = write_random_clip(tmp_path / "clip", words.split())
    plain = Captioner.from_checkpoint(checkpoint, device="cpu", num_beams=4, num_return=4)
    reranking = Captioner.from_checkpoint(checkpoint, device="cpu", num_beams=4, rerank_clip=str(clip_folder))
    files = sorted((scenes_source / "Images").iterdir())[:8]
    pixels = torch.stack([plain.pixels_from_bytes(path.read_bytes()) for path in files])
    model_ranked = plain.describe(pixels)
    best, all_four = reranking.describe(pixels), reranking.describe(pixels, num_return=4)

    clip = transformers.CLIPModel.from_pretrained(clip_folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(clip_folder)
    processor = transformers.CLIPImageProcessor.from_pretrained(clip_folder)
    with torch.no_grad():  # by hand: the encoder's 64 px pixels to CLIP's 32, CLIP's mean and std, its two towers
        small = TF.center_crop(TF.resize(pixels, [32], TF.InterpolationMode.BICUBIC, antialias=True), [32, 32])
        mean, std = torch.tensor(processor.image_mean)[:, None, None], torch.tensor(processor.image_std)[:, None, None]
        images = clip.get_image_features(pixel_values=(small / 255 - mean) / std).pooler_output
        images = torch.nn.functional.normalize(images, dim=-1)
    changed = 0
    for image, row, top, ranked in zip(images, model_ranked, best, all_four, strict=True):
        texts = [alternative["caption"] for alternative in row["alternatives"]]
        with torch.no_grad():
            batch = tokenizer([PROMPT + text for text in texts], padding=True, return_tensors="pt")
            embedded = clip.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            captions = torch.nn.functional.normalize(embedded.pooler_output, dim=-1)
        cosine = (captions @ image).numpy()  # ranked by the cosine: CLIP-S ties every unrelated caption at 0
        closest = int(np.argmax(cosine))
        assert top["caption"] == texts[closest]
        assert top["clip_score"] == pytest.approx(2.5 * max(float(cosine[closest]), 0.0), abs=2e-3)
        assert top["score"] == pytest.approx(row["alternatives"][closest]["score"], abs=1e-4)
        # All four, closest first: the model's captions with their own log-probabilities, reordered.
        order = np.argsort(-cosine, kind="stable")
        assert [a["caption"] for a in ranked["alternatives"]] == [texts[i] for i in order]
        assert [a["score"] for a in ranked["alternatives"]] == pytest.approx(
            [row["alternatives"][i]["score"] for i in order], abs=1e-4
        )
        changed += top["caption"] != row["caption"]
    assert changed, "CLIP agreed with the model on every image: the test would not see reranking switched off"

    # From the command line, each answer carries its CLIP-S; an exported folder cannot rerank (no torch, no CLIP).
    main(
        [
            "caption",
            str(files[0]),
            "--ckpt_path",
            str(checkpoint),
            "--num_beams",
            "4",
            "--rerank_clip",
            str(clip_folder),
            "--json",
            "--device",
            "cpu",
        ]
    )
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert answer["caption"] == best[0]["caption"] and answer["clip_score"] == pytest.approx(best[0]["clip_score"])
    with pytest.raises(CaptionerError, match="exported folder.*--rerank_clip"):
        load_captioner(tmp_path, rerank_clip=str(clip_folder))
    # The server's model copies load the same reranker (`serve --rerank_clip`).
    from captioner.serve.api import CaptionAPI

    api = CaptionAPI(checkpoint, {"num_beams": 4}, rerank_clip=str(clip_folder))
    api.setup("cpu")
    assert api.captioner.reranker.name == str(clip_folder)
    served = api.captioner.describe(pixels[:2])
    assert [(row["caption"], row["clip_score"]) for row in served] == [
        (row["caption"], row["clip_score"]) for row in best[:2]
    ]
    assert [row["score"] for row in served] == pytest.approx([row["score"] for row in best[:2]], abs=1e-5)
