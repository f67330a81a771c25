import json
import logging

import numpy as np
import pytest
import torch

from captioner.data import features as features_module
from captioner.data.features import (
    INDEX_FILE,
    PARTIAL_FILE,
    PROGRESS_FILE,
    cache_dir_for,
    cache_key,
    prepare_features,
)
from captioner.data.images import load_image
from captioner.models.encoder import ImageEncoder

SPEC = {"backbone": "resnet18", "weights": None, "image_size": 32}


def names_of(scenes, count=24):
    return sorted(p.name for p in (scenes / "Images").iterdir())[:count]


def build(root, scenes, names, **overrides):
    spec = {**SPEC, **overrides}
    return prepare_features(root, scenes / "Images", names, batch_size=8, num_workers=0, **spec)


def test_cache_matches_the_encoder_and_is_fp16_memory_mapped(tmp_path, scenes):
    names = names_of(scenes)
    cache = build(tmp_path, scenes, names)
    assert isinstance(cache.features, np.memmap)
    assert cache.features.dtype == np.float16 and cache.features.shape == (24, 512)
    encoder = ImageEncoder("resnet18", None)
    images = torch.stack([load_image(scenes / "Images" / name, 32) for name in names[:4]])
    with torch.inference_mode():
        expected = encoder(images).numpy()
    np.testing.assert_allclose(np.asarray(cache.features[:4], dtype=np.float32), expected, rtol=1e-2, atol=1e-2)
    assert not (cache.directory / PROGRESS_FILE).exists() and not (cache.directory / PARTIAL_FILE).exists()


def test_reused_when_nothing_changed_and_recomputed_when_the_key_changes(tmp_path, scenes, monkeypatch):
    names = names_of(scenes)
    first = build(tmp_path, scenes, names)
    calls = []
    original = features_module.extract_features
    monkeypatch.setattr(features_module, "extract_features", lambda *a, **k: calls.append(a) or original(*a, **k))
    assert build(tmp_path, scenes, names).directory == first.directory
    assert calls == []
    for change in ({"image_size": 48}, {"backbone": "resnet34"}, {"weights": "IMAGENET1K_V1"}):
        key = cache_key(**{**SPEC, **change}, file_names=names)
        assert cache_dir_for(tmp_path, **{**SPEC, **change}, key=key) != first.directory
    other = build(tmp_path, scenes, names[:-1])  # a different image list
    assert other.directory != first.directory and len(calls) == 1
    other = build(tmp_path, scenes, names, image_size=40)
    assert other.directory != first.directory and len(calls) == 2


def test_interrupted_extraction_resumes_to_an_identical_cache(tmp_path, scenes, monkeypatch):
    names = names_of(scenes)
    reference = build(tmp_path / "reference", scenes, names)

    # Save progress after every batch and die in the middle of the third batch.
    monkeypatch.setattr(features_module, "SAVE_PROGRESS_EVERY_S", -1.0)
    seen = {"batches": 0}
    original_forward = ImageEncoder.forward

    def dying_forward(self, images):
        seen["batches"] += 1
        if seen["batches"] == 3:
            raise RuntimeError("killed")
        return original_forward(self, images)

    monkeypatch.setattr(ImageEncoder, "forward", dying_forward)
    with pytest.raises(RuntimeError, match="killed"):
        build(tmp_path / "resumed", scenes, names)
    directory = next((tmp_path / "resumed").iterdir())
    progress = json.loads((directory / PROGRESS_FILE).read_text())
    assert progress["done"] == 16 and not (directory / INDEX_FILE).exists()

    monkeypatch.setattr(ImageEncoder, "forward", original_forward)
    batches_seen = []
    monkeypatch.setattr(
        ImageEncoder, "forward", lambda self, images: batches_seen.append(len(images)) or original_forward(self, images)
    )
    resumed = build(tmp_path / "resumed", scenes, names)
    assert batches_seen == [8]  # only the missing rows were computed
    np.testing.assert_array_equal(np.asarray(resumed.features), np.asarray(reference.features))


def test_truncated_cache_is_detected_and_rebuilt(tmp_path, scenes, caplog):
    names = names_of(scenes)
    cache = build(tmp_path, scenes, names)
    path = cache.directory / "features.npy"
    expected = np.asarray(cache.features).copy()
    del cache
    path.write_bytes(path.read_bytes()[:-1000])
    with caplog.at_level(logging.WARNING):
        rebuilt = build(tmp_path, scenes, names)
    assert "rebuilding" in caplog.text
    np.testing.assert_array_equal(np.asarray(rebuilt.features), expected)


def test_undecodable_images_are_recorded_not_fatal(tmp_path, scenes):
    names = names_of(scenes, 10)
    (scenes / "Images" / names[3]).write_bytes(b"not a jpeg at all")
    cache = build(tmp_path, scenes, names)
    assert list(cache.failed) == [names[3]]
    assert not np.asarray(cache.features[3]).any() and np.asarray(cache.features[4]).any()
