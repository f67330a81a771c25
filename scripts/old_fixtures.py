"""Freeze files written by older captioner versions as test fixtures (tests/fixtures/old/<version>/).

    python scripts/old_fixtures.py 0.1 f712408    # the last commit of captioner 0.1 (decoders named by a string)
    python scripts/old_fixtures.py 0.2 882b838    # the last commit of captioner 0.2 (a torchvision ResNet by name)
    python scripts/old_fixtures.py 0.2 882b838 --export_only    # add 0.2's export of the frozen checkpoint
    python scripts/old_fixtures.py 0.2 882b838 --recaption      # more images, captions and scores, same files

Checks the commit out in a temporary git worktree, trains the tiny test config with *that* version's code (today's
installed libraries), captions a few of its scenes with that version's `Captioner`; where that version could
export (0.2), exports the checkpoint with its `export` command and captions the same images with its torch-free
`OnnxCaptioner`. Writes (what is left out, and how a test puts it back: `tests/old_files.py`):

    checkpoint.pt     the checkpoint that version wrote, except the frozen encoder's tensors: a seeded random
                      ResNet18 (`weights: null`), 45 MB that any version rebuilds from torchvision and the seed
    export/           the folder that version exported, its encoder.onnx without the initializers' bytes (the same
                      45 MB, folded by the ONNX exporter)
    frozen.json       the commit, what was left out (names, shapes, dtypes, SHA-256 of the bytes, so a test checks
                      that what it rebuilds is what was written), and that version's captions of the images, with
                      its score of each (the caption's log-probability)
    images/           the images captioned: the first of the scenes it trained on, and with `--recaption` more
                      scenes it never saw (written by today's generator), captioned by that version from the
                      frozen checkpoint and export

`tests/test_old_files.py` puts everything back, checks every digest, and captions with today's code.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.old_files import ENCODER_GRAPH, OLD, rebuilt_checkpoint, strip_encoder_graph, tensor_digest  # noqa: E402

IMAGES = 4
ENCODER = {"torchvision": "resnet18", "seed": 0}
CAPTION = """
import json, sys
from pathlib import Path
from captioner.inference import Captioner
captioner = Captioner.from_checkpoint(sys.argv[1], device="cpu")
paths = sorted(Path(sys.argv[2]).iterdir())
print(json.dumps(dict(zip([p.name for p in paths], captioner.caption(paths)))))
"""
# With the score of each caption (`Prediction(source, caption, score, error)` in 0.1 and 0.2).
PREDICT = """
import json, sys
from pathlib import Path
from captioner.inference import Captioner
captioner = Captioner.from_checkpoint(sys.argv[1], device="cpu")
paths = sorted(Path(sys.argv[2]).iterdir())
print(json.dumps({p.name: [row.caption, row.score] for p, row in zip(paths, captioner.predict(paths))}))
"""
PREDICT_EXPORTED = """
import json, sys
from pathlib import Path
from captioner.runtime import OnnxCaptioner
captioner = OnnxCaptioner(sys.argv[1])
paths = sorted(Path(sys.argv[2]).iterdir())
print(json.dumps({p.name: [row.caption, row.score] for p, row in zip(paths, captioner.predict(paths))}))
"""
MORE_IMAGES = 12
CAPTION_EXPORTED = """
import json, sys
from pathlib import Path
from captioner.runtime import OnnxCaptioner
captioner = OnnxCaptioner(sys.argv[1])
paths = sorted(Path(sys.argv[2]).iterdir())
print(json.dumps(dict(zip([p.name for p in paths], captioner.caption(paths)))))
"""


@contextmanager
def checked_out(commit: str, tmp: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    """That commit's code in a git worktree under `tmp`, and the environment that runs it (not today's package)."""
    code = tmp / "code"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(code), commit], check=True, capture_output=True
    )
    try:
        yield code, {"PYTHONPATH": str(code), "WANDB_MODE": "disabled", "PATH": "/usr/bin:/bin"}
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(code)], check=True)


def run_json(script: str, arguments: list[str], cwd: Path, env: dict[str, str]) -> dict:
    """The JSON object the last line of `script`'s output holds, run with that version's code."""
    output = subprocess.run(
        [sys.executable, "-c", script, *arguments], check=True, capture_output=True, text=True, cwd=cwd, env=env
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def train_and_caption(target: Path, version: str, commit: str, code: Path, env: dict[str, str], tmp: Path) -> Path:
    """Train the tiny config with that version, freeze its checkpoint and captions in `target`; the checkpoint."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "captioner",
            "fit",
            "--config",
            str(code / "tests/conf/tiny.yaml"),
            "--data.data_dir",
            str(tmp / "scenes"),
            "--data.work_dir",
            str(tmp / "work"),
            "--trainer.default_root_dir",
            str(tmp),
            "--trainer.logger.init_args.save_dir",
            str(tmp / "runs"),
            "--trainer.max_epochs",
            "3",
        ],
        check=True,
        cwd=tmp,
        env=env,
    )
    (checkpoint,) = list((tmp / "runs").rglob("last.ckpt"))
    images = tmp / "images"
    images.mkdir()
    for path in sorted((tmp / "scenes" / "Images").iterdir())[:IMAGES]:
        shutil.copy(path, images / path.name)
    captions = run_json(CAPTION, [str(checkpoint), str(images)], tmp, env)
    written = torch.load(checkpoint, map_location="cpu", weights_only=False)
    left_out = {
        name: {"shape": list(tensor.shape), "dtype": str(tensor.dtype), "sha256": tensor_digest(tensor)}
        for name, tensor in written["state_dict"].items()
        if name.startswith("encoder.")
    }
    for name in left_out:
        del written["state_dict"][name]
    if target.exists():
        shutil.rmtree(target)
    (target / "images").mkdir(parents=True)
    torch.save(written, target / "checkpoint.pt")
    for path in images.iterdir():
        shutil.copy(path, target / "images" / path.name)
    (target / "frozen.json").write_text(
        json.dumps(
            {
                "version": version,
                "commit": commit,
                "encoder": ENCODER,
                "left_out": left_out,
                "captions": captions,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"{target}: {len(left_out)} encoder tensors left out, captions {captions}")
    return checkpoint


def export_and_caption(target: Path, checkpoint: Path, code: Path, env: dict[str, str], tmp: Path) -> None:
    """Export `checkpoint` with that version's `export`, caption the frozen images with its runtime, and freeze the
    folder (its encoder graph's rebuildable bytes left out) and the captions in `target`."""
    folder = tmp / "export"
    subprocess.run(
        [sys.executable, "-m", "captioner", "export", "--ckpt_path", str(checkpoint), "--output", str(folder)],
        check=True,
        cwd=tmp,
        env=env,
    )
    captions = run_json(CAPTION_EXPORTED, [str(folder), str(target / "images")], tmp, env)
    frozen = json.loads((target / "frozen.json").read_text())
    left_out = strip_encoder_graph(folder / ENCODER_GRAPH, frozen)
    if (target / "export").exists():
        shutil.rmtree(target / "export")
    shutil.copytree(folder, target / "export")
    frozen["export"] = {"left_out": left_out, "captions": captions}
    (target / "frozen.json").write_text(json.dumps(frozen, indent=1) + "\n")
    print(f"{target / 'export'}: {len(left_out)} encoder graph tensors left out, captions {captions}")


def recaption(target: Path, code: Path, env: dict[str, str], tmp: Path) -> None:
    """More images in `target` (scenes that version never saw), and that version's captions and scores of every
    image from the frozen checkpoint (and export), as it wrote them: the tests then compare scores too."""
    from captioner.data.synthetic import write_synthetic_dataset

    scenes = write_synthetic_dataset(tmp / "more", MORE_IMAGES, seed=11)
    for index, path in enumerate(sorted((scenes / "Images").iterdir())):
        shutil.copy(path, target / "images" / f"unseen_{index:02d}.jpg")
    checkpoint = tmp / "old.ckpt"
    torch.save(rebuilt_checkpoint(target), checkpoint)
    frozen = json.loads((target / "frozen.json").read_text())
    rows = run_json(PREDICT, [str(checkpoint), str(target / "images")], tmp, env)
    frozen["captions"] = {name: caption for name, (caption, _) in rows.items()}
    frozen["scores"] = {name: score for name, (_, score) in rows.items()}
    if "export" in frozen:
        from tests.old_files import rebuilt_export

        folder = rebuilt_export(target, tmp / "export")
        rows = run_json(PREDICT_EXPORTED, [str(folder), str(target / "images")], tmp, env)
        frozen["export"]["captions"] = {name: caption for name, (caption, _) in rows.items()}
        frozen["export"]["scores"] = {name: score for name, (_, score) in rows.items()}
    (target / "frozen.json").write_text(json.dumps(frozen, indent=1) + "\n")
    print(f"{target}: {len(rows)} images captioned and scored by {frozen['version']}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("version", help="the version's name, the fixture's folder (0.1, 0.2)")
    parser.add_argument("commit", help="that version's last commit")
    parser.add_argument(
        "--export_only",
        action="store_true",
        help="export the checkpoint already frozen for that version instead of training anew",
    )
    parser.add_argument(
        "--recaption",
        action="store_true",
        help=f"add {MORE_IMAGES} unseen scenes and record that version's captions and scores of every image",
    )
    options = parser.parse_args(argv)
    target = OLD / options.version
    with (
        tempfile.TemporaryDirectory(prefix="captioner-old-") as tmp,
        checked_out(options.commit, Path(tmp)) as (code, env),
    ):
        tmp = Path(tmp)
        if options.recaption:
            recaption(target, code, env, tmp)
            return
        if options.export_only:
            checkpoint = tmp / "old.ckpt"
            torch.save(rebuilt_checkpoint(target), checkpoint)
        else:
            checkpoint = train_and_caption(target, options.version, options.commit, code, env, tmp)
        if (code / "captioner" / "export.py").exists():
            export_and_caption(target, checkpoint, code, env, tmp)


if __name__ == "__main__":
    main()
