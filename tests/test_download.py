import shutil

import kagglehub
import pytest

from captioner.core.errors import CaptionerError
from captioner.data.download import KAGGLE_DATASET, read_caption_set, resolve_dataset


def seed_kagglehub_cache(cache, source, version=1):
    """Lay out a dataset as kagglehub 1.x stores a completed versioned download."""
    owner, slug = KAGGLE_DATASET.split("/")
    base = cache / "datasets" / owner / slug
    shutil.copytree(source, base / "versions" / str(version))
    (base / f"{version}.complete").touch()
    return base / "versions" / str(version)


def test_pinned_version_is_found_in_kagglehubs_cache_without_network(scenes_source, tmp_path, monkeypatch):
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kh"))
    expected = seed_kagglehub_cache(tmp_path / "kh", scenes_source)
    assert resolve_dataset(None, KAGGLE_DATASET, 1) == expected
    records, images_dir, _, _ = read_caption_set(expected)
    assert len(records) == 120 and images_dir == expected / "Images"


def test_a_caption_set_nested_one_folder_down_is_found(scenes_source, tmp_path):
    shutil.copytree(scenes_source, tmp_path / "archive" / "mini-coco")
    _, images_dir, found, _ = read_caption_set(tmp_path / "archive")
    assert type(found).__name__ == "Coco" and images_dir == tmp_path / "archive" / "mini-coco" / "Images"


def test_failed_download_says_how_to_use_a_local_copy(monkeypatch):
    def offline(handle, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(kagglehub, "dataset_download", offline)
    with pytest.raises(CaptionerError) as caught:
        resolve_dataset(None, KAGGLE_DATASET, 1)
    message = str(caught.value)
    assert f"{KAGGLE_DATASET}/versions/1" in message and "--data.data_dir" in message and "ConnectionError" in message


def test_data_dir_never_calls_kagglehub(scenes_source, monkeypatch):
    monkeypatch.setattr(kagglehub, "dataset_download", lambda *a, **k: pytest.fail("kagglehub was called"))
    assert resolve_dataset(str(scenes_source), KAGGLE_DATASET, 1) == scenes_source


def test_synthetic_set_is_generated_once_when_missing(tmp_path):
    root = resolve_dataset(str(tmp_path / "demo"), KAGGLE_DATASET, 1, synthetic_images=12)
    assert (root / "captions.json").is_file() and len(list((root / "Images").iterdir())) == 12
    stamp = (root / "captions.json").stat().st_mtime_ns
    resolve_dataset(str(tmp_path / "demo"), KAGGLE_DATASET, 1, synthetic_images=12)
    assert (root / "captions.json").stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    (tmp_path / "empty").mkdir()
    assert (
        resolve_dataset(str(tmp_path / "empty"), KAGGLE_DATASET, 1, synthetic_images=12) / "captions.json"
    ).is_file()


def test_generated_scenes_never_touch_a_folder_that_holds_anything(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "captions.csv").write_text("image,caption\nx.jpg,a caption\n")
    root = resolve_dataset(str(tmp_path / "mine"), KAGGLE_DATASET, 1, synthetic_images=12)
    assert sorted(p.name for p in root.iterdir()) == ["captions.csv"]  # untouched


def test_data_dir_that_is_not_a_folder_is_a_clear_error(tmp_path):
    with pytest.raises(CaptionerError, match="is not a folder"):
        resolve_dataset(str(tmp_path / "nowhere"), KAGGLE_DATASET, 1)
