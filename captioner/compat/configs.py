"""Configs and command lines of older captioners, rewritten into today's keys before LightningCLI reads them, one
deprecation line per old key:

- captioner 0.2's `model.beam_size`, `model.length_penalty` and `model.max_decode_length` (now under
  `model.decoding`), and its `data.backbone`, `data.weights` and `data.image_size`, refused with the encoder config
  to write instead (the encoder is a part of the model since 0.3);
- captioner 0.3's flat datamodule options, grouped into parts in 0.4 (`data.val_size` is `data.splits.val_size`,
  `data.batch_size` is `data.loading.batch_size`, `data.feature_store: cache` is `data.feature_store.kind: cache`,
  ...), and `data.object_annotations` (now `model.extra_metrics.objects`);
- class paths that moved (`captioner.compat.checkpoints.AtomicCheckpointIO`).

A config file that needs rewriting is handed to LightningCLI as the rewritten text (jsonargparse reads a config
given as a string as it reads a file; `captioner.shipped.with_shipped_configs` does it as it reads each file); one
that does not is passed on as it is.
"""

from __future__ import annotations

import sys
from typing import Any

from captioner.core.errors import CaptionerError

MOVED_KEYS = {
    # captioner 0.2
    "model.beam_size": "model.decoding.num_beams",
    "model.length_penalty": "model.decoding.length_penalty",
    "model.max_decode_length": "model.decoding.max_length",
    # captioner 0.3: the datamodule's options, grouped into parts
    "data.kaggle_dataset": "data.origin.kaggle_dataset",
    "data.kaggle_version": "data.origin.kaggle_version",
    "data.synthetic_images": "data.origin.synthetic_images",
    "data.val_size": "data.splits.val_size",
    "data.test_size": "data.splits.test_size",
    "data.split_seed": "data.splits.seed",
    "data.split_file": "data.splits.file",
    "data.restval": "data.splits.restval",
    "data.min_word_count": "data.captions.min_word_count",
    "data.max_caption_length": "data.captions.max_length",
    "data.online_features": "data.needs.online_features",
    "data.features": "data.needs.features",
    "data.train_items": "data.needs.train_items",
    "data.resident_features": "data.feature_store.resident",
    "data.resident_budget_gb": "data.feature_store.resident_budget_gb",
    "data.stream_dir": "data.feature_store.stream_dir",
    "data.stream_cache_gb": "data.feature_store.stream_cache_gb",
    "data.extraction_batch_size": "data.extraction.batch_size",
    "data.compile_encoder": "data.extraction.compile_encoder",
    "data.decode_threads": "data.extraction.decode_threads",
    "data.extraction_part_size": "data.extraction.part_size",
    "data.batch_size": "data.loading.batch_size",
    "data.eval_batch_size": "data.loading.eval_batch_size",
    "data.num_workers": "data.loading.num_workers",
    "data.train_crop": "data.loading.train_crop",
    "data.object_annotations": "model.extra_metrics.objects",
}
STORE_KINDS = ("auto", "cache", "stream")  # 0.3's `data.feature_store` values, now `data.feature_store.kind`
DEFAULT_STORE = "captioner.features.stores.DefaultStore"
MOVED_CLASSES = {
    "captioner.compat.checkpoints.AtomicCheckpointIO": "captioner.models.checkpoints.AtomicCheckpointIO",
}
REMOVED_KEYS = ("data.backbone", "data.weights", "data.image_size")
# The predictions writer is installed by the command line with its own keys (`--predictions.write_images`); configs
# of 0.3 listed it among the callbacks, last, and set its options through the last callback's.
WRITER = "captioner.callbacks.CaptionWriter"
WRITER_NAMES = (WRITER, "captioner.callbacks.writer.CaptionWriter", "callbacks.CaptionWriter")
WRITER_OPTIONS = ("output_dir", "write_images", "image_width", "attention_maps")
SUBCOMMANDS = ("fit", "validate", "test", "predict")
_said: set[str] = set()


def _note(old: str, new: str) -> None:
    if old not in _said:
        _said.add(old)
        print(f"captioner: '{old}' is deprecated; it is '{new}' now (it works for now).", file=sys.stderr)


def refuse_removed(options: dict[str, Any]) -> None:
    """Stop on captioner 0.2's `data.backbone` / `data.weights` / `data.image_size`, with the config to write.

    Raises:
        CaptionerError: When any of them is set.
    """
    backbone, weights, image_size = (options.get(key.split(".")[1]) for key in REMOVED_KEYS)
    if backbone is None and weights is None and image_size is None:
        return
    weights_text = "null" if weights is None else weights
    raise CaptionerError(
        "--data.backbone, --data.weights and --data.image_size were removed in captioner 0.3: the encoder is a part "
        "of the model now. Write instead:\n"
        "  model:\n    encoder:\n      class_path: captioner.encoders.TorchvisionEncoder\n"
        f"      init_args: {{model: {backbone or 'resnet50'}, weights: {weights_text}, "
        f"image_size: {image_size or 224}}}\n"
        "(or on the command line: --model.encoder captioner.encoders.TorchvisionEncoder "
        f"--model.encoder.model {backbone or 'resnet50'} --model.encoder.weights {weights_text} "
        f"--model.encoder.image_size {image_size or 224})."
    )


# ---------------------------------------------------------------- config files
def _renamed_classes(tree: Any) -> tuple[Any, bool]:
    if isinstance(tree, dict):
        pairs = [(key, _renamed_classes(value)) for key, value in tree.items()]
        return {key: value for key, (value, _) in pairs}, any(changed for _, (_, changed) in pairs)
    if isinstance(tree, list):
        pairs = [_renamed_classes(value) for value in tree]
        return [value for value, _ in pairs], any(changed for _, changed in pairs)
    if isinstance(tree, str) and tree in MOVED_CLASSES:
        _note(tree, MOVED_CLASSES[tree])
        return MOVED_CLASSES[tree], True
    return tree, False


def _store(tree: dict[str, Any]) -> dict[str, Any]:
    """The data section's `feature_store` as a `DefaultStore` entry (a 0.3 string, or nothing yet), to add to."""
    store = tree.get("feature_store")
    if store is None or isinstance(store, str):
        if isinstance(store, str):
            _note(f"data.feature_store: {store}", f"data.feature_store.kind: {store}")
        store = {"class_path": DEFAULT_STORE, "init_args": {} if store is None else {"kind": store}}
        tree["feature_store"] = store
    store.setdefault("init_args", {})
    return store


def upgraded_config(tree: Any) -> tuple[Any, bool]:
    """A parsed config with old keys in today's places (see the module docstring), and whether anything changed.

    Raises:
        CaptionerError: For options captioner removed (`data.backbone`, ...), naming what to write instead.
    """
    if not isinstance(tree, dict):
        return tree, False
    tree, changed = _renamed_classes(tree)
    for subcommand in SUBCOMMANDS:
        if isinstance(tree.get(subcommand), dict):
            tree[subcommand], nested = upgraded_config(tree[subcommand])
            changed = changed or nested
    trainer = tree.get("trainer")
    if isinstance(trainer, dict) and isinstance(trainer.get("callbacks"), list):
        kept = []
        for callback in trainer["callbacks"]:
            path = callback.get("class_path") if isinstance(callback, dict) else callback
            if path in WRITER_NAMES:
                _note("a CaptionWriter in trainer.callbacks", "predictions: (installed by the command line)")
                options = callback.get("init_args") or {} if isinstance(callback, dict) else {}
                tree.setdefault("predictions", {}).update(options)
                changed = True
            else:
                kept.append(callback)
        trainer["callbacks"] = kept
    data = tree.get("data")
    if isinstance(data, dict):
        refuse_removed(data)
        if isinstance(data.get("feature_store"), str) and data["feature_store"] in STORE_KINDS:
            _store(data)
            changed = True
    for old, new in MOVED_KEYS.items():
        section, key = old.split(".", 1)
        part = tree.get(section)
        if not isinstance(part, dict) or key not in part:
            continue
        value = part.pop(key)
        _note(old, new)
        changed = True
        target_section, *path = new.split(".")
        target = tree.setdefault(target_section, {})
        if path[0] == "feature_store":
            target = _store(target)["init_args"]
            path = path[1:]
        for name in path[:-1]:
            target = target.setdefault(name, {})
            if "init_args" in target or "class_path" in target:
                target = target.setdefault("init_args", {})
        target[path[-1]] = value
    return tree, changed


# ---------------------------------------------------------------- command lines
def upgraded_arguments(argv: list[str], config_flags: tuple[str, ...] = ("--config", "-c")) -> list[str]:
    """A LightningCLI command line with old keys in today's places: `--data.val_size 20` is `--data.splits.val_size
    20`, a config file that holds old keys is passed as its rewritten text.

    Raises:
        CaptionerError: For options captioner removed, naming what to write instead.
    """
    out: list[str] = []
    index = 0
    while index < len(argv):
        item = argv[index]
        if item in config_flags and index + 1 < len(argv):
            out += [item, argv[index + 1]]  # config files are rewritten as they are read (captioner.shipped)
            index += 2
            continue
        if item.startswith("--trainer.callbacks+=") and item.split("=", 1)[1] in WRITER_NAMES:
            _note("--trainer.callbacks+=CaptionWriter", "nothing: the command line installs it (--predictions.*)")
            index += 1
            continue
        if item.startswith("--"):
            key, equals, value = item[2:].partition("=")
            if key.startswith("trainer.callbacks.") and key.rsplit(".", 1)[-1] in WRITER_OPTIONS:
                _note(f"--{key}", f"--predictions.{key.rsplit('.', 1)[-1]}")
                key = f"predictions.{key.rsplit('.', 1)[-1]}"
                item = f"--{key}" + (f"={value}" if equals else "")
            removed = next((name for name in REMOVED_KEYS if key == name), None)
            if removed:
                given = value if equals else (argv[index + 1] if index + 1 < len(argv) else None)
                refuse_removed({removed.split(".")[1]: given})
            if key == "data.feature_store":
                given = value if equals else (argv[index + 1] if index + 1 < len(argv) else "")
                if given in STORE_KINDS:
                    _note(f"--data.feature_store {given}", f"--data.feature_store.kind {given}")
                    out += ["--data.feature_store.kind", given]
                    index += 1 if equals else 2
                    continue
            if key in MOVED_KEYS:
                _note(f"--{key}", f"--{MOVED_KEYS[key]}")
                item = f"--{MOVED_KEYS[key]}" + (f"={value}" if equals else "")
        elif item in MOVED_CLASSES:
            _note(item, MOVED_CLASSES[item])
            item = MOVED_CLASSES[item]
        out.append(item)
        index += 1
    return out
