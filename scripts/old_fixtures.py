"""Freeze checkpoints written by older captioner versions as test fixtures (tests/fixtures/old/<version>/).

    python scripts/old_fixtures.py 0.1 f712408    # the last commit of captioner 0.1 (decoders named by a string)
    python scripts/old_fixtures.py 0.2 882b838    # the last commit of captioner 0.2 (a torchvision ResNet by name)

Checks the commit out in a temporary git worktree, trains the tiny test config with *that* version's code (today's
installed libraries), captions a few of its scenes with that version's `Captioner`, and writes:

    checkpoint.pt     the checkpoint that version wrote, except the frozen encoder's tensors: a seeded random
                      ResNet18 (`weights: null`), 45 MB that any version rebuilds from torchvision and the seed
    frozen.json       the commit, the encoder tensors left out (name, shape, dtype, SHA-256 of their bytes, so a test
                      rebuilds them and checks they are the ones written), and that version's captions of the images
    images/           the images captioned

`tests/test_old_files.py` puts the encoder tensors back, checks every digest, and captions with today's code.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "old"
IMAGES = 4
CAPTION = """
import json, sys
from pathlib import Path
from captioner.inference import Captioner
captioner = Captioner.from_checkpoint(sys.argv[1], device="cpu")
paths = sorted(Path(sys.argv[2]).iterdir())
print(json.dumps(dict(zip([p.name for p in paths], captioner.caption(paths)))))
"""


def tensor_digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def old_version(version: str, commit: str) -> None:
    """Train, caption and freeze with the code of `commit` (see the module docstring)."""
    target = FIXTURES / version
    with tempfile.TemporaryDirectory(prefix="captioner-old-") as tmp:
        tmp = Path(tmp)
        code = tmp / "code"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(code), commit], check=True,
                       capture_output=True)  # fmt: skip
        try:
            env = {"PYTHONPATH": str(code), "WANDB_MODE": "disabled", "PATH": "/usr/bin:/bin"}
            subprocess.run([sys.executable, "-m", "captioner", "fit", "--config", str(code / "tests/conf/tiny.yaml"),
                            "--data.data_dir", str(tmp / "scenes"), "--data.work_dir", str(tmp / "work"),
                            "--trainer.default_root_dir", str(tmp), "--trainer.logger.init_args.save_dir",
                            str(tmp / "runs"), "--trainer.max_epochs", "3"], check=True, cwd=tmp, env=env)  # fmt: skip
            (checkpoint,) = list((tmp / "runs").rglob("last.ckpt"))
            images = tmp / "images"
            images.mkdir()
            for path in sorted((tmp / "scenes" / "Images").iterdir())[:IMAGES]:
                shutil.copy(path, images / path.name)
            captions = json.loads(subprocess.run([sys.executable, "-c", CAPTION, str(checkpoint), str(images)],
                                                 check=True, capture_output=True, text=True, cwd=tmp,
                                                 env=env).stdout.strip().splitlines()[-1])  # fmt: skip
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(code)], check=True)
        written = torch.load(checkpoint, map_location="cpu", weights_only=False)
        left_out = {name: {"shape": list(tensor.shape), "dtype": str(tensor.dtype), "sha256": tensor_digest(tensor)}
                    for name, tensor in written["state_dict"].items() if name.startswith("encoder.")}  # fmt: skip
        for name in left_out:
            del written["state_dict"][name]
        if target.exists():
            shutil.rmtree(target)
        (target / "images").mkdir(parents=True)
        torch.save(written, target / "checkpoint.pt")
        for path in images.iterdir():
            shutil.copy(path, target / "images" / path.name)
        (target / "frozen.json").write_text(json.dumps({
            "version": version, "commit": commit, "encoder": {"torchvision": "resnet18", "seed": 0},
            "left_out": left_out, "captions": captions,
        }, indent=1) + "\n")  # fmt: skip
    print(f"{target}: {len(left_out)} encoder tensors left out, captions {captions}")


if __name__ == "__main__":
    old_version(sys.argv[1], sys.argv[2])
