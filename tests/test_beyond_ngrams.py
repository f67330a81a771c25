"""Metrics beyond n-grams: CLIPScore and RefCLIPScore as the paper defines them (against a hand computation with a
random small CLIP saved as a hub folder), CHAIR-i/CHAIR-s on hand-made cases and COCO's synonyms, and the demo's
scenes, where a model that ignores the image names shapes and colours that are not drawn."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from captioner.evaluation.chair import ObjectVocabulary, chair_scores, read_objects, vocabulary_for
from captioner.evaluation.clip_score import (
    PROMPT,
    ClipModel,
    clip_scores,
    ref_clip_scores,
    score_captions,
    write_random_clip,
)

WORDS = "a an the red blue green yellow circle square triangle on left right of small large photo depicts".split()


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A random small CLIP saved as the hub gives one: config and weights, an image processor, a tokenizer."""
    return write_random_clip(tmp_path_factory.mktemp("tiny-clip"), WORDS)


def test_clip_score_and_ref_clip_score_follow_the_papers_formulas_on_hand_made_vectors():
    images = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    captions = np.array([[0.6, 0.8], [1.0, 0.0], [-1.0, 0.0]])
    clip_s = clip_scores(images, captions)
    np.testing.assert_allclose(clip_s, [2.5 * 0.6, 0.0, 0.0])  # w = 2.5; a negative cosine counts 0
    references = [np.array([[0.0, 1.0], [0.6, 0.8]]), np.array([[0.0, 1.0]]), np.array([[1.0, 0.0]])]
    ref = ref_clip_scores(clip_s, captions, references)
    best = 1.0  # the first caption equals its second reference
    np.testing.assert_allclose(ref, [2 * 1.5 * best / (1.5 + best), 0.0, 0.0])
    # A caption close to its image (CLIP-S 1.5) whose every reference points away (cosine -1): the reference
    # cosine is clipped at 0, so RefCLIP-S is 0 (left unclipped, the harmonic mean would be 2 * 1.5 * -1 / 0.5 = -6).
    away = ref_clip_scores(np.array([1.5]), np.array([[0.6, 0.8]]), [np.array([[-0.6, -0.8]])])
    np.testing.assert_allclose(away, [0.0])


def test_clip_scores_of_captions_equal_a_hand_computation_with_the_model(clip_folder, scenes_source, tmp_path):
    import transformers

    images = sorted((scenes_source / "Images").iterdir())[:4]
    captions = {
        p.name: text
        for p, text in zip(
            images, ["a red circle", "a blue square on the left", "a small green triangle", "a yellow circle"]
        )
    }
    references = {p.name: ["a red circle on the left", "a large square"] for p in images}
    model = ClipModel(str(clip_folder))
    result = score_captions(model, captions, {p.name: p for p in images}, references, cache_dir=tmp_path / "cache")
    # By hand: the model's own towers, the processor's pixels, the paper's prefix and weight.
    clip = transformers.CLIPModel.from_pretrained(clip_folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(clip_folder)
    processor = transformers.CLIPImageProcessor.from_pretrained(clip_folder)
    from PIL import Image

    with torch.no_grad():
        pixels = processor([Image.open(p).convert("RGB") for p in images], return_tensors="pt")["pixel_values"]
        image = torch.nn.functional.normalize(clip.get_image_features(pixel_values=pixels).pooler_output, dim=-1)

        def text(texts):
            batch = tokenizer(texts, padding=True, return_tensors="pt")
            out = clip.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            return torch.nn.functional.normalize(out.pooler_output, dim=-1)

        caption = text([PROMPT + captions[p.name] for p in images])
        expected = 2.5 * torch.clamp((image * caption).sum(-1), min=0)
        refs = text([PROMPT + r for r in references[images[0].name]])
        best = torch.clamp((caption @ refs.T).max(dim=1).values, min=0)
        harmonic = torch.where(expected + best > 0, 2 * expected * best / (expected + best), torch.zeros(()))
    per_image = np.array([result["per_image"][p.name] for p in images])
    np.testing.assert_allclose(per_image, expected.numpy(), atol=2e-3)  # our resize vs the processor's: close
    assert result["CLIPScore"] == pytest.approx(100 * float(expected.mean()), abs=0.2)
    assert result["RefCLIPScore"] == pytest.approx(100 * float(harmonic.mean()), abs=0.2)
    # The image embeddings were cached: a second evaluation reads them (the same scores) and a long text is cut.
    again = score_captions(
        model, {images[0].name: "a red circle " * 6}, {images[0].name: images[0]}, cache_dir=tmp_path / "cache"
    )
    assert again["truncated"] == 1 and list((tmp_path / "cache").iterdir())


def test_chair_counts_hallucinated_objects_per_mention_and_per_caption():
    vocabulary = ObjectVocabulary.coco()
    assert vocabulary.objects_in("Two dogs and a man playing frisbee near a hot dog stand") == [
        "dog",
        "person",
        "frisbee",
        "hot dog",
    ]  # plurals, synonyms, a two-word object that is not a dog
    assert vocabulary.objects_in("a baby elephant next to a passenger train") == ["elephant", "train"]
    captions = {"1": "a man riding a bike", "2": "a cat on a couch with a remote", "3": "a plate of food"}
    objects = {"1": ["person", "bicycle"], "2": ["cat", "couch"], "3": ["dining table"]}
    scores = chair_scores(captions, objects, vocabulary)
    # Named: person, bicycle | cat, couch, remote | none: 1 hallucinated of 5 mentions, in 1 of 3 captions.
    assert scores["CHAIR-i"] == pytest.approx(100 / 5) and scores["CHAIR-s"] == pytest.approx(100 / 3)
    assert scores["hallucinated"] == {"2": ["remote"]}
    # An object the references name counts as present (the paper's rule).
    with_references = chair_scores(captions, objects, vocabulary, {"2": ["a cat and a tv remote on a sofa"]})
    assert with_references["CHAIR-i"] == 0 and with_references["CHAIR-s"] == 0


def test_chair_reads_coco_instances_and_the_demos_drawn_scenes(scenes_source, tmp_path):
    instances = {
        "images": [{"id": 7, "file_name": "a.jpg"}],
        "categories": [{"id": 18, "name": "dog"}],
        "annotations": [{"image_id": 7, "category_id": 18}, {"image_id": 7, "category_id": 18}],
    }
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    objects, coco = read_objects(tmp_path / "instances.json")
    assert coco and objects == {"7": ["dog"], "a.jpg": ["dog"]}
    scenes, coco = read_objects(scenes_source / "captions.json")
    assert not coco and len(scenes) == 2 * 120  # by file name and by image id
    vocabulary = vocabulary_for(scenes, coco, None)  # the annotations' own names: shapes and colours
    payload = json.loads((scenes_source / "captions.json").read_text())
    truth = {image["file_name"]: image for image in payload["images"]}
    references = {}
    for annotation in payload["annotations"]:
        references.setdefault(annotation["image_id"], []).append(annotation["caption"])
    faithful = {name: references[image["id"]][0] for name, image in truth.items()}
    blind = {name: "a small red circle on the left" for name in truth}  # one caption for every image
    assert chair_scores(faithful, scenes, vocabulary)["CHAIR-s"] == 0  # the references name what is drawn
    hallucinating = chair_scores(blind, scenes, vocabulary)
    assert hallucinating["CHAIR-s"] > 50 and hallucinating["CHAIR-i"] > 30


def test_evaluate_scores_any_results_file_as_test_does(clip_folder, scenes_source, tmp_path, capsys):
    """`python -m captioner evaluate`: a COCO results file against the COCO captions, with the images (CLIPScore)
    and the scenes' objects (CHAIR): the COCO metrics as pycocoevalcap computes them, and every extra one."""
    from captioner.cli import main
    from captioner.evaluation.metrics import coco_caption_scores

    payload = json.loads((scenes_source / "captions.json").read_text())
    first = {}
    for annotation in payload["annotations"]:
        first.setdefault(annotation["image_id"], annotation["caption"])
    chosen = [image for image in payload["images"]][:30]
    results = [
        {"image_id": image["id"], "caption": first[image["id"]] if n % 3 else "a small red circle on the left"}
        for n, image in enumerate(chosen)
    ]
    results.append({"image_id": 99999, "caption": "an image of no reference"})
    (tmp_path / "results.json").write_text(json.dumps(results))
    main(
        [
            "evaluate",
            str(tmp_path / "results.json"),
            "--references",
            str(scenes_source / "captions.json"),
            "--images",
            str(scenes_source / "Images"),
            "--clip_model",
            str(clip_folder),
            "--objects",
            str(scenes_source / "captions.json"),
            "--output",
            str(tmp_path / "report.json"),
        ]
    )
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["images"] == 30 and report["not_matched"] == 1
    references = {}
    for annotation in payload["annotations"]:
        references.setdefault(annotation["image_id"], []).append(annotation["caption"])
    captions = {image["file_name"]: row["caption"] for image, row in zip(chosen, results)}
    expected = coco_caption_scores(captions, {image["file_name"]: references[image["id"]] for image in chosen})
    assert report["metrics"]["pycocoevalcap"]["CIDEr"] == pytest.approx(expected["scores"]["CIDEr"], abs=1e-3)
    chair, clip = report["metrics"]["chair"], report["metrics"]["clip"]
    assert 0 < chair["CHAIR-s"] < 50 and chair["captions"] == 30  # only some of the constant captions are wrong
    assert clip["images"] == 30 and "RefCLIPScore" in clip and clip["model"] == str(clip_folder)
    assert "CHAIR-i" in printed and "CLIPScore" in printed and "CIDEr" in printed


def test_bert_score_takes_each_captions_best_reference_with_a_small_local_bert(tmp_path):
    """BERTScore through torchmetrics on a 2-layer BERT built from a config and saved (no download): a caption equal
    to one of its references scores 100 whatever the others; a caption of other words scores less."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from captioner.evaluation.beyond import bert_scores

    words = "a red blue green circle square triangle on the left right top bottom small big".split()
    vocabulary = tmp_path / "vocab.txt"
    vocabulary.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    folder = tmp_path / "tiny-bert"
    BertTokenizerFast(vocab_file=str(vocabulary)).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(words) + 5,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).eval().save_pretrained(folder)
    references = {"1": ["a blue square on the left", "a red circle on the right"], "2": ["a small green triangle"]}
    scores = bert_scores({"1": "a red circle on the right", "2": "a small green triangle"}, references, str(folder))
    assert scores["f1"] == pytest.approx(100.0, abs=1e-3) and scores["captions"] == 2  # the matching reference won
    other = bert_scores({"1": "big square top", "2": "red circle bottom"}, references, str(folder))
    assert other["f1"] < 99.0  # a random BERT's tokens are alike (precision near 100), yet the words tell
