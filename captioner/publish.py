"""A trained captioner as the Hugging Face ecosystem shares models: a folder with `model.safetensors`, `config.json`,
the tokenizer and a model card (`README.md` with YAML metadata: `pipeline_tag: image-to-text`, `base_model`,
datasets, the test metrics as `model-index`), optionally the ONNX export, pushed to the Hub and loaded back by id.

    python -m captioner publish --ckpt_path best.ckpt --output my-captioner [--onnx [--quantize int8]]
        [--measure_dir photos/] [--push_to_hub user/name]
    Captioner.from_pretrained("user/name")            # or a folder; offline, the hub's cache
    python -m captioner caption photo.jpg --ckpt_path user/name

`config.json` holds what a checkpoint's `captioner` entry holds (encoder and decoder classes and options,
preprocessing, tokenizer, decoding settings): the weights and it rebuild the model with no network and no training
code path. `huggingface_hub` (`pip install 'captioner[hub]'`) writes the card and talks to the Hub.

With `--measure_dir`, the card also says how fast the model captions (images/s with its saved decoding, on the
publishing machine, named) and, for the ONNX export, how its captions differ from PyTorch's (int8 changes some).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from captioner.compat.checkpoints import upgrade
from captioner.core.errors import CaptionerError
from captioner.core.files import atomic_folder, write_json
from captioner.core.parts import require_library
from captioner.core.version import __version__
from captioner.models.checkpoints import CAPTIONER_KEY, read_checkpoint
from captioner.published import CONFIG, PUBLISHED_FORMAT, TOKENIZER, WEIGHTS, is_published, model_from_published

__all__ = ["is_published", "measure", "model_from_published", "publish", "push"]

log = logging.getLogger("captioner")
CARD = "README.md"
CARD_METRICS = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


def publish(
    checkpoint: str | Path,
    output: str | Path,
    onnx: bool = False,
    test_metrics: str | Path | None = None,
    dataset: str | None = None,
    license: str | None = None,
    quantize: str | None = None,
    measure_dir: str | Path | None = None,
    measure_images: int = 64,
) -> Path:
    """Write a checkpoint as a published folder.

    Args:
        checkpoint: A checkpoint written by `fit`.
        output: The folder to create (it must not exist, or be empty).
        onnx: Also export to ONNX into `onnx/` (the torch-free runtime reads it).
        test_metrics: The `test_metrics.json` whose scores the card reports (default: the one beside the
            checkpoint's run, when there is one).
        dataset: The hub id of the dataset it was trained on, for the card's metadata.
        license: A license identifier for the card (e.g. mit, apache-2.0).
        quantize: "int8": the ONNX export's decoder graphs quantised (`captioner.export.export_onnx`).
        measure_dir: Pictures like those the model will caption: the card reports the speed measured on them (and
            the ONNX export's differences from PyTorch).
        measure_images: The most of them used.

    Returns:
        The folder.

    Raises:
        CaptionerError: When the checkpoint cannot be read, the output is not empty, or huggingface_hub is missing.
    """
    from safetensors.torch import save_file

    from captioner.models.module import CaptionModel

    require_library("huggingface_hub", "hub", "publish")
    output, checkpoint = Path(output), Path(checkpoint)
    if output.exists() and any(output.iterdir()):
        raise CaptionerError(f"{output} is not empty: publish into a new folder.")
    if quantize is not None and not onnx:
        raise CaptionerError(f"--quantize {quantize} quantises the ONNX export: add --onnx.")
    pictures = _measure_pictures(measure_dir, measure_images) if measure_dir is not None else None
    data = read_checkpoint(checkpoint)
    meta = upgrade(data)
    model = CaptionModel.from_checkpoint(str(checkpoint)).eval()  # every check a checkpoint gets
    report = _test_report(checkpoint, test_metrics)
    run_config = _run_config(checkpoint)
    with atomic_folder(output) as folder:
        # Contiguous copies: safetensors stores no views, and tied weights are written once each.
        state = {name: tensor.detach().contiguous().clone() for name, tensor in model.state_dict().items()}
        save_file(state, folder / WEIGHTS, metadata={"format": "pt", "captioner_format": str(PUBLISHED_FORMAT)})
        write_json(
            folder / CONFIG,
            {
                "captioner_format": PUBLISHED_FORMAT,
                "captioner_version": __version__,
                "architectures": ["CaptionModel"],
                "pipeline_tag": "image-to-text",
                CAPTIONER_KEY: meta,
            },
        )
        write_json(folder / TOKENIZER, meta["vocabulary"])
        if onnx:
            from captioner.export import export_onnx

            export_onnx(model, folder / "onnx", quantize=quantize)
        speed = measure(model, pictures, folder / "onnx" if onnx else None) if pictures else None
        model_card(meta, report, run_config, onnx, dataset, license, speed).save(folder / CARD)
    log.info("Published %s into %s", checkpoint, output)
    return output


def _measure_pictures(folder: str | Path, count: int) -> list[Path]:
    from captioner.sources.images import IMAGE_EXTENSIONS, find_images

    pictures = find_images(folder).images[: max(1, count)]
    if not pictures:
        kinds = ", ".join(extension.lstrip(".") for extension in IMAGE_EXTENSIONS)
        raise CaptionerError(f"--measure_dir {folder} holds no image file ({kinds}).")
    return pictures


def _timed(caption: Callable[[Sequence[Path]], list], pictures: list[Path], batch_size: int) -> tuple[float, list]:
    """Images/s of `caption` over `pictures` after one warm-up batch (first-call costs: allocation, graph setup)."""
    caption(pictures[:batch_size])
    started = time.perf_counter()
    predictions = caption(pictures)
    return len(pictures) / (time.perf_counter() - started), predictions


def measure(model: Any, pictures: list[Path], onnx_folder: Path | None = None, batch_size: int = 32) -> dict:
    """How fast `model` captions `pictures` with its saved decoding (PyTorch, on its device), and with an ONNX
    export how fast that runs and how its captions differ from PyTorch's.

    Returns:
        `images`, `batch_size`, `hardware`, `pytorch` (`images_per_s`) and, with `onnx_folder`, `onnx`
        (`precision`, `images_per_s`, `identical_captions` in %, `mean_abs_score_difference`).
    """
    import torch

    from captioner.core.hardware import describe_cpu
    from captioner.inference import Captioner

    device = next(model.parameters()).device
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else describe_cpu()
    captioner = Captioner(model, batch_size=batch_size)
    rate, reference = _timed(captioner.predict, pictures, batch_size)
    result: dict[str, Any] = {
        "images": len(pictures),
        "batch_size": batch_size,
        "hardware": hardware,
        "pytorch": {"images_per_s": round(rate, 2)},
    }
    if onnx_folder is not None:
        from captioner.inference import OnnxCaptioner

        runtime = OnnxCaptioner(onnx_folder)
        runtime.batch_size = batch_size
        onnx_rate, exported = _timed(runtime.predict, pictures, batch_size)
        pairs = [(a, b) for a, b in zip(reference, exported, strict=True) if a.caption is not None and b.caption]
        int8 = bool(runtime.manifest.quantized["int8"])
        result["onnx"] = {
            "precision": "int8 decoder" if int8 else "fp32",
            "images_per_s": round(onnx_rate, 2),
            "identical_captions": round(100 * sum(a.caption == b.caption for a, b in pairs) / max(1, len(pairs)), 1),
            "mean_abs_score_difference": round(sum(abs(a.score - b.score) for a, b in pairs) / max(1, len(pairs)), 4),
        }
    return result


def push(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload a published folder to the Hugging Face Hub (the repository is created if need be); its URL."""
    huggingface_hub = require_library("huggingface_hub", "hub", "publish --push_to_hub")
    api = huggingface_hub.HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(
            folder_path=str(folder), repo_id=repo_id, commit_message=f"captioner {__version__}: publish"
        )
    except Exception as error:  # no network, no token, no rights: the hub client raises many types
        raise CaptionerError(
            f"Could not upload {folder} to {repo_id} ({type(error).__name__}: {error}); log in with "
            "`hf auth login` (or set HF_TOKEN) and check the network."
        ) from error
    return str(getattr(commit, "repo_url", f"https://huggingface.co/{repo_id}"))


# ------------------------------------------------------------------ the model card
def _test_report(checkpoint: Path, given: str | Path | None) -> dict | None:
    candidates = (
        [Path(given)]
        if given
        else [checkpoint.parent.parent / "test_metrics.json", checkpoint.parent / "test_metrics.json"]
    )
    for path in candidates:
        if path.is_file():
            try:
                return json.loads(path.read_text(encoding="utf-8"))
            except ValueError as error:
                raise CaptionerError(f"{path} is not a test report: {error}.") from error
    if given:
        raise CaptionerError(f"{given} does not exist.")
    return None


def _run_config(checkpoint: Path) -> dict | None:
    """The run's config.yaml (LightningCLI writes it into the run folder), for the objective and data."""
    import yaml

    path = checkpoint.parent.parent / "config.yaml"
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return None


def _base_models(meta: dict) -> list[str]:
    """Hub ids of the pretrained parts (an HF encoder's or LM's id; a timm model's hub name), for `base_model`."""
    bases = []
    encoder = meta["encoder"].get("init_args") or {}
    if encoder.get("model_id") and encoder.get("pretrained", True) and "/" in str(encoder["model_id"]):
        bases.append(encoder["model_id"])
    if meta["encoder"]["class_path"].endswith("TimmEncoder") and encoder.get("pretrained"):
        bases.append(f"timm/{encoder['model_name']}")
    decoder = meta["decoder"].get("init_args") or {}
    if decoder.get("lm") and decoder.get("pretrained") and not Path(str(decoder["lm"])).exists():
        bases.append(str(decoder["lm"]))
    return bases


def model_card(
    meta: dict,
    report: dict | None,
    run_config: dict | None,
    onnx: bool,
    dataset: str | None,
    license: str | None,
    speed: dict | None = None,
) -> Any:
    """The model card: metadata the Hub indexes, then what the model is, how it was measured, and how to use it."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    dataset_id = dataset or "custom"
    results = []
    if report:
        scores = report["metrics"]["pycocoevalcap"]
        extra = {
            "CLIPScore": (report["metrics"].get("clip") or {}).get("CLIPScore"),
            "CHAIR-s": (report["metrics"].get("chair") or {}).get("CHAIR-s"),
        }
        for name, value in [*((n, scores.get(n)) for n in CARD_METRICS), *extra.items()]:
            if value is not None:
                results.append(
                    EvalResult(
                        task_type="image-to-text",
                        task_name="Image captioning",
                        dataset_type=dataset_id,
                        dataset_name=dataset or "held-out test split",
                        dataset_split="test",
                        metric_type=name.lower(),
                        metric_name=name,
                        metric_value=round(float(value), 2),
                    )
                )
    bases = _base_models(meta)
    data = ModelCardData(
        library_name="captioner",
        pipeline_tag="image-to-text",
        license=license,
        tags=["image-captioning", "captioner"],
        base_model=bases or None,
        datasets=[dataset] if dataset else None,
        eval_results=results or None,
        model_name="captioner",
    )
    encoder, decoder = meta["encoder"], meta["decoder"]
    objective = ((run_config or {}).get("model") or {}).get("objective") or {}
    objective_name = str(objective.get("class_path", "captioner.models.objectives.CrossEntropy")).rsplit(".", 1)[-1]
    decoding = meta["decoding"]
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        "# An image captioner trained with captioner",
        "",
        f"- **Encoder**: `{encoder['class_path'].rsplit('.', 1)[-1]}` {json.dumps(encoder.get('init_args') or {})}",
        f"- **Decoder**: `{decoder['class_path'].rsplit('.', 1)[-1]}` "
        f"{json.dumps({k: v for k, v in (decoder.get('init_args') or {}).items() if k != 'lm_config'})}",
        f"- **Tokenizer**: `{str(meta['vocabulary'].get('class_path', 'words')).rsplit('.', 1)[-1]}`",
        f"- **Preprocessing**: {json.dumps(meta['preprocessing'])}",
        f"- **Training objective**: {objective_name}"
        + (
            " (self-critical sequence training on CIDEr-D)"
            if objective_name == "SelfCritical"
            else " (teacher forcing)"
        ),
        f"- **Blind baseline**: {meta['blind']}",
        "",
        "## Evaluation",
        "",
    ]
    if report:
        lines += [
            f"Test split of {report['images']} images; decoding: {json.dumps(report['decoding'])}; tokenizer "
            f"for the COCO metrics: {report['tokenizer']}. Scores on a 0-100 scale (CIDEr is CIDEr-D x 100).",
            "",
            "| metric | score |",
            "|---|---|",
        ]
        lines += [f"| {name} | {value:.2f} |" for name, value in report["metrics"]["pycocoevalcap"].items()]
        for group, keys in (("chair", ("CHAIR-i", "CHAIR-s")), ("clip", ("CLIPScore", "RefCLIPScore"))):
            lines += [
                f"| {key} | {report['metrics'][group][key]:.2f} |"
                for key in keys
                if key in (report["metrics"].get(group) or {})
            ]
    else:
        lines.append("No test report was found beside the checkpoint (`python -m captioner test` writes one).")
    lines += ["", "## Speed", ""]
    if speed:
        lines += [
            f"Measured when it was published, on {speed['hardware']}: {speed['images']} images, "
            f"{speed['batch_size']} at a time, with the saved decoding (image decoding included).",
            "",
            "| runtime | precision | images/s | captions identical to PyTorch's | mean abs. log-prob. difference |",
            "|---|---|---|---|---|",
            f"| PyTorch | fp32 | {speed['pytorch']['images_per_s']:.1f} | | |",
        ]
        if "onnx" in speed:
            exported = speed["onnx"]
            lines.append(
                f"| ONNX Runtime | {exported['precision']} | {exported['images_per_s']:.1f} | "
                f"{exported['identical_captions']:.1f} % | {exported['mean_abs_score_difference']:.4f} |"
            )
    else:
        lines.append("Not measured (`python -m captioner publish ... --measure_dir photos/` measures it).")
    lines += [
        "",
        f"Decoding saved with the model: {json.dumps(decoding)}",
        "",
        "## Use",
        "",
        "```python",
        "from captioner import Captioner",
        "",
        'captioner = Captioner.from_pretrained("<this repository or folder>")',
        'print(captioner.caption(["photo.jpg"]))',
        "```",
        "",
        "```bash",
        "python -m captioner caption photo.jpg --ckpt_path <this repository or folder> --num_beams 5",
        "```",
    ]
    if onnx:
        lines += [
            "",
            "Without torch (`pip install onnxruntime numpy pillow` beside captioner):",
            "",
            "```python",
            "from captioner.inference import OnnxCaptioner",
            "",
            'print(OnnxCaptioner("<folder>/onnx").caption(["photo.jpg"]))',
            "```",
        ]
    lines += ["", f"Published with captioner {__version__}."]
    return ModelCard("\n".join(lines))


def publish_parser() -> argparse.ArgumentParser:
    """The options of `python -m captioner publish`."""
    parser = argparse.ArgumentParser(prog="python -m captioner publish", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint written by fit")
    parser.add_argument("--output", required=True, help="the folder to write (new or empty)")
    parser.add_argument("--onnx", action="store_true", help="also export to ONNX into onnx/")
    parser.add_argument("--quantize", choices=["int8"], default=None, help="with --onnx: int8 decoder graphs")
    parser.add_argument(
        "--measure_dir",
        default=None,
        help="pictures to measure the speed (and the ONNX export's differences) on, for the card",
    )
    parser.add_argument("--measure_images", type=int, default=64, help="the most pictures measured")
    parser.add_argument(
        "--test_metrics",
        default=None,
        help="the test_metrics.json the card reports (default: the one beside the checkpoint's run)",
    )
    parser.add_argument("--dataset", default=None, help="the hub id of the training data, for the card")
    parser.add_argument("--license", default=None, help="a license id for the card (mit, apache-2.0, ...)")
    parser.add_argument("--push_to_hub", default=None, metavar="USER/NAME", help="upload the folder there")
    parser.add_argument("--private", action="store_true", help="create the hub repository private")
    return parser


def publish_command(argv: list[str]) -> None:
    """`python -m captioner publish ...` (see the module docstring)."""
    options = publish_parser().parse_args(argv)
    folder = publish(
        options.ckpt_path,
        options.output,
        options.onnx,
        options.test_metrics,
        options.dataset,
        options.license,
        options.quantize,
        options.measure_dir,
        options.measure_images,
    )
    print(f"published: {folder} ({', '.join(sorted(p.name for p in folder.iterdir()))})")
    if options.push_to_hub:
        print(f"uploaded: {push(folder, options.push_to_hub, options.private)}")
