"""Compare a demo checkpoint with its ONNX exports on the demo's held-out test images.

    python scripts/export_check.py runs/demo/captioner-demo/<run>/checkpoints/<best>.ckpt

Exports the checkpoint four ways (fp32; int8 decoder; int8 decoder and
dynamic int8 encoder; int8 decoder and static int8 encoder calibrated on 64
training pictures), captions the 200 held-out test images of `configs/demo.yaml` with
PyTorch and with ONNX Runtime (greedy, and 5 beams with length penalty 0.6), and prints the COCO
caption metrics (pycocoevalcap, raw references) of each side by side, with
the share of captions identical to PyTorch's.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from captioner import Captioner  # noqa: E402
from captioner.data.datamodule import CaptionDataModule  # noqa: E402
from captioner.data.options import Captions, Origin, Splits  # noqa: E402
from captioner.data.splits import load_splits  # noqa: E402
from captioner.evaluation.report import evaluate_captions  # noqa: E402
from captioner.export.onnx import export_onnx  # noqa: E402
from captioner.inference import OnnxCaptioner  # noqa: E402
from captioner.models.module import CaptionModel  # noqa: E402

# Decoding compared: greedy, and 5 beams with a length penalty (the runtime's normalisation against PyTorch's).
SETTINGS = ({"num_beams": 1}, {"num_beams": 5, "length_penalty": 0.6})


def demo_split(name: str) -> tuple[list[Path], list[list[str]]]:
    """One split of the demo's prepared data: its images and their raw references."""
    settings = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())["data"]
    datamodule = CaptionDataModule(
        data_dir=settings["data_dir"],
        work_dir=settings["work_dir"],
        origin=Origin(**settings["origin"]),
        splits=Splits(**settings["splits"]),
        captions=Captions(**settings["captions"]),
    )
    prepared = datamodule.preparation.prepared()
    images_dir = Path(prepared.read_dataset()["images_dir"])
    records = load_splits(prepared.splits_file)[0][name]
    return [images_dir / record.file_name for record in records], [list(record.captions) for record in records]


def demo_test_set() -> tuple[list[Path], list[list[str]]]:
    """The demo's held-out test images and their raw references."""
    return demo_split("test")


def main(checkpoint: str) -> None:
    paths, references = demo_test_set()
    torch_side = Captioner.from_checkpoint(checkpoint, device="cpu", batch_size=50)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        calibration = Path(tmp) / "calibration"  # 64 training pictures: never the test images
        calibration.mkdir()
        for path in demo_split("train")[0][:64]:
            (calibration / path.name).symlink_to(path)
        runtimes = {}
        for name, quantize, encoder, samples in (
            ("ONNX fp32", None, False, None),
            ("ONNX int8 decoder", "int8", False, None),
            ("ONNX int8 all, dynamic", "int8", True, None),
            ("ONNX int8 all, static", "int8", True, calibration),
        ):
            folder = export_onnx(
                CaptionModel.from_checkpoint(checkpoint), Path(tmp) / name.replace(" ", "_"), quantize, encoder, samples
            )
            runtimes[name] = OnnxCaptioner(folder, batch_size=50)
        for settings in SETTINGS:
            reference = [p.caption for p in torch_side.predict(paths, **settings)]
            sides = {"PyTorch fp32": reference}
            for name, runtime in runtimes.items():
                sides[name] = [p.caption for p in runtime.predict(paths, **settings)]
            for name, captions in sides.items():
                rows = [
                    {"file_name": str(p), "caption": c, "references": refs}
                    for p, c, refs in zip(paths, captions, references)
                ]
                scores = evaluate_captions(rows)["scores"]
                identical = 100 * sum(a == b for a, b in zip(captions, reference)) / len(paths)
                label = "greedy" if settings["num_beams"] == 1 else f"beam {settings['num_beams']}"
                if settings.get("length_penalty"):
                    label += f", length penalty {settings['length_penalty']}"
                results[(label, name)] = {
                    "CIDEr": scores["CIDEr"],
                    "BLEU-4": scores["BLEU-4"],
                    "identical to PyTorch (%)": identical,
                }
    print(f"\n{'held-out demo test (200 images)':<52}{'CIDEr':>9}{'BLEU-4':>9}{'same as PyTorch':>17}")
    for (label, name), row in results.items():
        print(
            f"{name + ', ' + label:<52}{row['CIDEr']:>9.2f}{row['BLEU-4']:>9.2f}"
            f"{row['identical to PyTorch (%)']:>16.1f}%"
        )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
