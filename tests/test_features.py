import logging
import shutil
import threading

import numpy as np
import pytest
import torch

from captioner.core.errors import CaptionerError
from captioner.encoders.base import ImageEncoder
from captioner.encoders.preprocessing import Preprocessing
from captioner.encoders.torchvision_models import TorchvisionEncoder
from captioner.features import cache as cache_module
from captioner.features import extraction as extraction_module
from captioner.features.cache import (
    INDEX_FILE,
    PARTIAL_FILE,
    PARTS_DIR,
    CacheSink,
    extract_cache,
    open_cache,
    prepare_cache,
)
from captioner.features.keys import FeatureSpec, cache_key
from captioner.sources.parts import folder_parts

ENCODER = {"model": "resnet18", "weights": None, "image_size": 32}


def spec_of(**overrides) -> FeatureSpec:
    return FeatureSpec(TorchvisionEncoder(**{**ENCODER, **overrides}))


def names_of(scenes, count=24):
    return sorted(p.name for p in (scenes / "Images").iterdir())[:count]


def build(root, scenes, names, per_part=1000, **overrides):
    return prepare_cache(
        root, scenes / "Images", names, spec_of(**overrides), batch_size=8, threads=2, per_part=per_part
    )


def test_cache_matches_the_encoder_and_is_fp16_memory_mapped(tmp_path, scenes):
    names = names_of(scenes)
    cache = build(tmp_path, scenes, names)
    assert isinstance(cache.features, np.memmap)
    assert cache.features.dtype == np.float16 and cache.features.shape == (24, 512)
    encoder = TorchvisionEncoder("resnet18", None, 32)
    images = torch.stack([Preprocessing(32).from_file(scenes / "Images" / name) for name in names[:4]])
    with torch.inference_mode():
        expected = encoder(images).numpy()
    np.testing.assert_allclose(np.asarray(cache.features[:4], dtype=np.float32), expected, rtol=1e-2, atol=1e-2)
    assert not (cache.directory / PARTS_DIR).exists() and not (cache.directory / PARTIAL_FILE).exists()


def test_reused_when_nothing_changed_and_recomputed_when_the_key_changes(tmp_path, scenes, monkeypatch):
    names = names_of(scenes)
    first = build(tmp_path, scenes, names)
    calls = []
    original = cache_module.extract_parts
    monkeypatch.setattr(cache_module, "extract_parts", lambda *a, **k: calls.append(a) or original(*a, **k))
    assert build(tmp_path, scenes, names).directory == first.directory
    assert calls == []
    for change in ({"image_size": 48}, {"model": "resnet34"}, {"weights": "IMAGENET1K_V1"}, {"resize": "library"}):
        spec = spec_of(**change)
        assert spec.directory(tmp_path, spec.key(names)) != first.directory
    # The decode path and the precision are part of the key: a CPU-built cache is not what a GPU would compute.
    encoder = TorchvisionEncoder(**ENCODER)
    keys = {
        cache_key(encoder.spec(), encoder.preprocessing, names, decode=decode, precision=precision)
        for decode in ("pil-reduced", "nvjpeg+pil")
        for precision in ("fp32", "bf16")
    }
    assert len(keys) == 4 and spec_of().key(names, "cpu") in keys
    other = build(tmp_path, scenes, names[:-1])  # a different image list
    assert other.directory != first.directory and len(calls) == 1
    other = build(tmp_path, scenes, names, image_size=40)
    assert other.directory != first.directory and len(calls) == 2


def test_a_cache_made_by_another_encoder_is_refused_naming_both(tmp_path, scenes):
    names = names_of(scenes, 8)
    cache = build(tmp_path, scenes, names)
    other = spec_of(model="resnet34")
    with pytest.raises(
        CaptionerError,
        match=r"made by the encoder TorchvisionEncoder\(model='resnet18'.*not by the "
        r"configured TorchvisionEncoder\(model='resnet34'",
    ):
        open_cache(cache.directory, other.key(names), other.encoder_spec)


def test_interrupted_extraction_resumes_at_the_parts_it_finished_to_an_identical_cache(tmp_path, scenes, monkeypatch):
    names = names_of(scenes)
    reference = build(tmp_path / "reference", scenes, names, per_part=8)

    # Parts of 8 images, batches of 8: die in the middle of the third part.
    seen = {"batches": 0}
    original_forward = ImageEncoder.forward

    def dying_forward(self, images, grid=False):
        seen["batches"] += len(images) > 1  # not the one-image pass that measures the feature size
        if seen["batches"] == 3:
            raise RuntimeError("killed")
        return original_forward(self, images, grid)

    monkeypatch.setattr(ImageEncoder, "forward", dying_forward)
    with pytest.raises(RuntimeError, match="killed"):
        build(tmp_path / "resumed", scenes, names, per_part=8)
    directory = next((tmp_path / "resumed").iterdir())
    done = sorted(path.name for path in (directory / PARTS_DIR).glob("*.json"))
    assert done == ["images-000000.json", "images-000001.json"] and not (directory / INDEX_FILE).exists()

    monkeypatch.setattr(ImageEncoder, "forward", original_forward)
    batches_seen = []
    monkeypatch.setattr(
        ImageEncoder,
        "forward",
        lambda self, images, grid=False: (
            (len(images) > 1 and batches_seen.append(len(images))) or original_forward(self, images, grid)
        ),
    )
    resumed = build(tmp_path / "resumed", scenes, names, per_part=8)
    assert batches_seen == [8]  # only the part not finished was computed
    np.testing.assert_array_equal(np.asarray(resumed.features), np.asarray(reference.features))
    assert not (directory / PARTS_DIR).exists()  # assembled, then cleaned up


def test_ranks_claim_the_parts_and_rank_0_assembles_the_cache_a_single_process_makes(tmp_path, scenes):
    """Two ranks at once (threads, with a barrier as DDP's): each claims its next part when it finishes one, every
    part is extracted once, and rank 0 assembles the cache one process alone makes."""
    names = names_of(scenes)
    reference = build(tmp_path / "reference", scenes, names, per_part=4)
    spec = spec_of()
    key = spec.key(names)
    directory = spec.directory(tmp_path / "shared", key)
    directory.mkdir(parents=True)
    sink = CacheSink(directory, key, spec, names, scenes / "Images")
    parts = folder_parts(names, scenes / "Images", 4)
    written, barrier = [], threading.Barrier(2)
    writer = sink.writer
    sink.writer = lambda part: written.append((threading.current_thread().name, part.name)) or writer(part)

    def rank(number: int) -> None:
        extraction_module.extract_parts(
            parts, spec, sink, batch_size=4, threads=1, rank=number, world_size=2, barrier=barrier.wait
        )

    threads = [threading.Thread(target=rank, args=(number,), name=f"rank{number}") for number in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(name for _, name in written) == sorted(part.name for part in parts)  # each part once
    assert {who for who, _ in written} == {"rank0", "rank1"}  # both ranks worked
    shared = open_cache(directory, key)
    np.testing.assert_array_equal(np.asarray(shared.features), np.asarray(reference.features))
    assert not (directory / "claims").exists()


def test_a_truncated_complete_cache_is_refused_and_kept_until_the_user_removes_it(tmp_path, scenes):
    names = names_of(scenes)
    cache = build(tmp_path, scenes, names)
    path, directory = cache.directory / "features.npy", cache.directory
    expected = np.asarray(cache.features).copy()
    del cache
    path.write_bytes(path.read_bytes()[:-1000])
    truncated = path.read_bytes()
    with pytest.raises(CaptionerError, match="Nothing was deleted. Remove that folder") as refused:
        build(tmp_path, scenes, names)
    assert str(directory) in str(refused.value)
    assert path.read_bytes() == truncated and (directory / "index.json").exists()  # untouched, not rebuilt
    shutil.rmtree(directory)  # what the message says to do
    rebuilt = build(tmp_path, scenes, names)
    np.testing.assert_array_equal(np.asarray(rebuilt.features), expected)


def test_undecodable_images_are_recorded_not_fatal(tmp_path, scenes):
    names = names_of(scenes, 10)
    (scenes / "Images" / names[3]).write_bytes(b"not a jpeg at all")
    cache = build(tmp_path, scenes, names)
    assert list(cache.failed) == [names[3]]
    assert not np.asarray(cache.features[3]).any() and np.asarray(cache.features[4]).any()


def test_device_decoding_path_matches_the_pil_path_and_survives_bad_files(tmp_path, scenes):
    """The GPU path (raw JPEG bytes decoded in batches by torchvision, resized as tensors) runs on the CPU too."""
    from PIL import Image

    names = names_of(scenes, 12)
    Image.open(scenes / "Images" / names[1]).save(scenes / "Images" / names[1], format="PNG")  # not a JPEG inside
    Image.open(scenes / "Images" / names[2]).convert("CMYK").save(scenes / "Images" / names[2], format="JPEG")
    data = (scenes / "Images" / names[3]).read_bytes()
    (scenes / "Images" / names[3]).write_bytes(data[: len(data) // 3])  # truncated JPEG
    spec = spec_of()
    key = spec.key(names)
    pil, device = (
        extract_cache(
            tmp_path / name,
            key,
            scenes / "Images",
            names,
            spec,
            "cpu",
            batch_size=4,
            threads=2,
            device_decode=device_decode,
        )
        for name, device_decode in (("pil", False), ("device", True))
    )
    assert names[3] in pil.failed
    ok = [i for i, name in enumerate(names) if name not in pil.failed and name not in device.failed]
    assert len(ok) >= 10
    a, b = (np.asarray(c.features[ok], dtype=np.float32) for c in (pil, device))
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() > 0.98  # same images, slightly different resampling


def test_out_of_memory_halves_the_batch_and_goes_on(tmp_path, scenes, monkeypatch, caplog):
    names = names_of(scenes, 16)
    reference = build(tmp_path / "reference", scenes, names)
    original_forward = ImageEncoder.forward
    sizes = []

    def small_device(self, images, grid=False):
        sizes.append(len(images)) if len(images) > 1 else None
        if len(images) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original_forward(self, images, grid)

    monkeypatch.setattr(ImageEncoder, "forward", small_device)
    with caplog.at_level(logging.WARNING):
        cache = build(tmp_path / "small", scenes, names)
    assert caplog.text.count("Out of device memory") == 2  # 8 -> 4 -> 2, then it stays at 2
    assert max(sizes[3:]) == 2
    np.testing.assert_allclose(
        np.asarray(cache.features, dtype=np.float32), np.asarray(reference.features, dtype=np.float32), atol=2e-2
    )


def test_a_resident_cache_gives_the_batches_the_disk_gives(scenes_source, tmp_path):
    """Held in memory (the default when it fits) or read from disk in the loader, training sees the same features;
    over the budget, the cache stays on disk, and `true` with too small a budget says so."""
    from captioner.cli import main
    from tests.conftest import tiny_args

    runs = {}
    for name, choice in (("resident", "auto"), ("disk", "false")):
        cli = main(
            tiny_args(
                "validate", scenes_source, tmp_path / "work", tmp_path / name, "--data.feature_store.resident", choice
            )
        )
        runs[name] = cli.datamodule
    assert runs["resident"].store.resident is not None and runs["disk"].store.resident is None
    train = {name: datamodule.datasets["train"].__getitems__(list(range(8))) for name, datamodule in runs.items()}
    assert "rows" in train["resident"] and "features" in train["disk"]  # the loader carries rows, not features
    gathered = runs["resident"].materialize(train["resident"])
    assert torch.equal(gathered["features"], train["disk"]["features"])
    assert torch.equal(gathered["tokens"], train["disk"]["tokens"])
    small = main(
        tiny_args(
            "validate",
            scenes_source,
            tmp_path / "work",
            tmp_path / "small",
            "--data.feature_store.resident_budget_gb",
            "0.000001",
        )
    )
    assert small.datamodule.store.resident is None
    with pytest.raises(SystemExit):
        main(
            tiny_args(
                "validate",
                scenes_source,
                tmp_path / "work",
                tmp_path / "refused",
                "--data.feature_store.resident",
                "true",
                "--data.feature_store.resident_budget_gb",
                "0.000001",
            )
        )


def test_a_streamed_extraction_cut_short_resumes_to_the_set_an_uninterrupted_one_writes(tmp_path, scenes, monkeypatch):
    """The streamed store's parts (runs of a folder's images here; shards alike): killed in the third part, then
    resumed from the two finished, every item (name, features, captions) as one run without a stop writes."""
    import litdata

    from captioner.features.streamed import prepare_streamed
    from captioner.sources.parts import folder_parts
    from captioner.sources.records import CaptionRecord

    names = names_of(scenes, 24)
    records = [CaptionRecord(name, (f"caption {i}", f"other {i}")) for i, name in enumerate(names)]
    splits = {"train": records[:16], "val": records[16:20], "test": records[20:]}
    parts = folder_parts(names, scenes / "Images", per_part=8)

    def items(feature_set) -> dict:
        found = {}
        for split in ("train", "val", "test"):
            dataset = litdata.StreamingDataset(feature_set.split(split))
            for index in range(len(dataset)):
                item = dataset[index]
                found[item["name"]] = (split, np.asarray(item["features"]).tobytes(), item["captions"])
        return found

    whole = prepare_streamed(str(tmp_path / "whole"), parts, splits, spec_of(), batch_size=8, threads=2)
    original_forward, seen = ImageEncoder.forward, {"batches": 0}

    def dying_forward(self, images, grid=False):
        seen["batches"] += len(images) > 1
        if seen["batches"] == 3:
            raise RuntimeError("killed")
        return original_forward(self, images, grid)

    monkeypatch.setattr(ImageEncoder, "forward", dying_forward)
    with pytest.raises(RuntimeError, match="killed"):
        prepare_streamed(str(tmp_path / "cut"), parts, splits, spec_of(), batch_size=8, threads=2)
    (folder,) = (tmp_path / "cut").iterdir()
    assert sorted(p.name for p in (folder / "parts").iterdir() if not p.name.startswith(".")) == [
        "images-000000",
        "images-000001",
    ]
    monkeypatch.setattr(ImageEncoder, "forward", original_forward)
    resumed = prepare_streamed(str(tmp_path / "cut"), parts, splits, spec_of(), batch_size=8, threads=2)
    assert items(resumed) == items(whole) and len(items(whole)) == 24
    assert resumed.meta["counts"] == whole.meta["counts"] == {"train": 16, "val": 4, "test": 4}
    assert resumed.meta["train_captions"] == 32
