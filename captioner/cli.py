"""The command line: `python -m captioner {fit,validate,test,predict}` through LightningCLI; `caption`, `serve`,
`export` and `configs` beside it. `--config` takes a path or the name of a shipped config (`demo`,
`decoders/transformer`)."""

from __future__ import annotations

import argparse
import errno
import importlib
import itertools
import json
import logging
import netrc
import os
import sys
import time
from pathlib import Path

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from captioner.callbacks.checkpoints import ResumableRun
from captioner.callbacks.publishing import PublishedModel
from captioner.callbacks.reports import TestReport
from captioner.callbacks.writer import CaptionWriter
from captioner.compat import names as compat
from captioner.compat.configs import upgraded_arguments
from captioner.core.errors import CaptionerError
from captioner.core.files import atomic_open
from captioner.core.hardware import checked_precision
from captioner.core.parts import add_allow_argument, allow_modules, class_paths_in
from captioner.data.datamodule import CaptionDataModule
from captioner.decoding import config as decoding
from captioner.encoders.base import encoder_trains
from captioner.models.building import check_checkpoint_file
from captioner.models.checkpoints import AtomicCheckpointIO
from captioner.models.decoders.base import decoder_features
from captioner.models.module import CaptionModel
from captioner.models.objectives.base import train_items_of
from captioner.runs import run_dir, run_to_continue
from captioner.shipped import with_shipped_configs

log = logging.getLogger("captioner")


def wandb_has_credentials() -> bool:
    """Whether W&B could log in without asking: an API key in the environment or in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def quiet_wandb(logger: WandbLogger) -> None:
    """Leave out what makes W&B print two warnings at every run start: Lightning passes `anonymous=None`, which W&B
    reports as a deprecated setting whatever its value, and W&B looks for a git repository in the save folder before
    anything has created it."""
    settings = getattr(logger, "_wandb_init", None)
    if isinstance(settings, dict) and settings.get("anonymous") is None:
        settings.pop("anonymous", None)
    if logger.save_dir:
        Path(logger.save_dir).mkdir(parents=True, exist_ok=True)


def _logger_configs(trainer_config) -> list:
    """The configured loggers (`trainer.logger` may be one, a list, or a bool)."""
    loggers = trainer_config.logger if isinstance(trainer_config.logger, list) else [trainer_config.logger]
    return [logger for logger in loggers if logger not in (None, False, True)]


def _uses_wandb(trainer_config) -> bool:
    return any("WandbLogger" in str(getattr(c, "class_path", c)) for c in _logger_configs(trainer_config))


def _save_dir(trainer_config) -> Path:
    for logger in _logger_configs(trainer_config):
        save_dir = getattr(getattr(logger, "init_args", None), "save_dir", None)
        if save_dir:
            return Path(save_dir)
    return Path(trainer_config.default_root_dir or ".")


def find_last_checkpoint(trainer_config) -> Path:
    """The newest `last.ckpt` under the runs folder, for `--ckpt_path last`.

    Each run writes into a folder of its own, so Lightning's own "last" (which
    looks only in the new run's folder) would find nothing; this looks across
    the runs of the logger's save_dir.

    Raises:
        CaptionerError: When there is none.
    """
    root = _save_dir(trainer_config)
    found = sorted(root.rglob("last*.ckpt"), key=lambda path: path.stat().st_mtime)
    if not found:
        raise CaptionerError(f"--ckpt_path last: no last.ckpt under {root}. Pass the checkpoint's path instead.")
    print(f"Resuming from {found[-1]}", file=sys.stderr)
    return found[-1]


class RunConfigSaver(SaveConfigCallback):
    """Save the resolved config into the run's own folder and hand it to the logger.

    Each run gets its own folder (see `captioner.runs.run_dir`), so a second
    run never collides with the first one's config.yaml.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        if trainer.is_global_zero:
            path = run_dir(trainer) / self.config_filename
            if path.exists() and self.config.get("ckpt_path"):  # a resumed run keeps its config.yaml
                path = path.with_name(f"config.resumed-{time.strftime('%Y%m%d-%H%M%S')}.yaml")
            with atomic_open(path, "w") as handle:
                handle.write(self.parser.dump(self.config, skip_none=False, skip_link_targets=False))
            for logger in trainer.loggers:
                logger.log_hyperparams({"config": self.config.clone().as_dict()})
        self.already_saved = True


class CaptionerCLI(LightningCLI):
    """LightningCLI with the data-to-model links and the project's defaults."""

    def add_arguments_to_parser(self, parser) -> None:
        # One encoder: the model's instance is the one the data side extracts features with.
        parser.link_arguments("model.encoder", "data.encoder", apply_on="instantiate")
        parser.link_arguments("model.trainable_encoder_blocks", "data.needs.online_features", compute_fn=encoder_trains)
        # What the parts need from the data, declared by them (`features`, `train_items`).
        parser.link_arguments("model.decoder", "data.needs.features", compute_fn=decoder_features)
        parser.link_arguments("model.objective", "data.needs.train_items", compute_fn=train_items_of)
        # The predictions writer, in every run, its options under their own keys (--predictions.write_images true):
        # it writes only when predicting, wherever the config's callbacks list puts the others.
        parser.add_lightning_class_args(CaptionWriter, "predictions")
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="After fit, run test with the best checkpoint and print the test metrics.",
        )

    def _parse_ckpt_path(self) -> None:
        # LightningCLI would replace the model config with the checkpoint's
        # hyperparameters, silently dropping options given for this run (beam
        # size, length penalty). Keep the config as given; CaptionModel checks
        # the checkpoint against it and refuses a mismatch with a clear message.
        return

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        # The config is the user's own: the modules it names may be imported again when a file names them
        # (prepared data, a checkpoint to resume or start from).
        allow_modules(*(path.rpartition(".")[0] for path in class_paths_in(config)))
        # Chosen for the accelerator this run uses, without initialising CUDA here (fork-based strategies refuse
        # a launcher that did); bf16 on a CPU only where the CPU has it.
        config.trainer.precision = checked_precision(config.trainer.precision, config.trainer.accelerator)
        if config.get("ckpt_path") == "last":
            config.ckpt_path = str(find_last_checkpoint(config.trainer))
        if config.get("ckpt_path") and config.ckpt_path not in ("best", "hpc"):
            check_checkpoint_file(config.ckpt_path)  # one line for a file that is not one, before anything runs
        if self.subcommand == "fit" and config.get("ckpt_path"):
            self._continue_run(config)
        if _uses_wandb(config.trainer) and "WANDB_MODE" not in os.environ and not wandb_has_credentials():
            os.environ["WANDB_MODE"] = "offline"
            print(
                "W&B: no API key found, logging offline; upload later with `wandb sync <save_dir>/wandb/offline-run-*` "
                "(or run `wandb login` first to log online).",
                file=sys.stderr,
            )

    def instantiate_trainer(self, **kwargs) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        install_atomic_checkpoints(trainer)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                quiet_wandb(logger)
        return trainer

    def _continue_run(self, config) -> None:
        """Resume into the run the checkpoint came from: the same folder, the same logger version (W&B run id)."""
        run = run_to_continue(config.ckpt_path)
        loggers = _logger_configs(config.trainer)
        if run is None or run.get("version") is None or not loggers:
            print(
                f"{config.ckpt_path} is not inside the run folder that wrote it (a copied file, or an older "
                "checkpoint): resuming its training state in a new run.",
                file=sys.stderr,
            )
            return
        for logger in loggers:
            logger.init_args.version = run["version"]  # W&B: the run id, resumed ("allow"); CSV: the folder
        print(f"Resuming run {run['version']} in {run['folder']}", file=sys.stderr)

    def after_fit(self) -> None:
        if self.config.fit.test_after_fit and not self.trainer.fast_dev_run:
            checkpoint = self.trainer.checkpoint_callback
            ckpt_path = "best" if checkpoint is not None and checkpoint.best_model_path else None
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt_path)


def install_atomic_checkpoints(trainer: Trainer) -> None:
    """Write checkpoints atomically (`captioner.models.checkpoints.AtomicCheckpointIO`) whatever the config says,
    unless it chose a checkpoint IO of its own."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


def _finish_wandb_runs(trainer: Trainer) -> None:
    """End the W&B run of this command, so a later `main()` in the same process starts a run of its own."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and getattr(logger, "_experiment", None) is not None:
            logger.experiment.finish()


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is now (test runners and notebooks swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _configure_logging() -> None:
    if not log.handlers:
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def caption_parser() -> argparse.ArgumentParser:
    """The options of `python -m captioner caption`."""
    from captioner.inference.engine import DEFAULT_DECODE_THREADS

    parser = argparse.ArgumentParser(prog="python -m captioner caption", description="Caption a few image files.")
    parser.add_argument(
        "paths",
        nargs="+",
        help="image files (jpg, png, bmp, webp, gif), or folders of them (every image under a folder, sorted)",
    )
    parser.add_argument(
        "--ckpt_path",
        required=True,
        help="a checkpoint written by `fit`, an exported or published folder, or a hub id (user/name)",
    )
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--decode_threads", type=int, default=DEFAULT_DECODE_THREADS, help="images decoded at once")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: a GPU if there is one)")
    parser.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per file: image, caption, score, "
        "confidence, alternatives, constraints_met, clip_score, error",
    )
    decoding.add_arguments(parser)
    add_allow_argument(parser)
    return parser


def caption_command(argv: list[str]) -> int:
    """`python -m captioner caption FILE... --ckpt_path CKPT`: print a caption per file (with `--num_return N`, the N
    ranked alternatives with their scores; with `--json`, one row per file: `captioner.decoding.answers.ROW_FIELDS`).

    Returns:
        0 when every file was captioned, 1 when some could not be read.
    """
    from captioner.decoding.answers import Prediction
    from captioner.inference.loading import load_captioner
    from captioner.sources.images import IMAGE_EXTENSIONS, files_and_folders

    options = caption_parser().parse_args(argv)
    allow_modules(*options.allow_module)
    captioner = load_captioner(
        options.ckpt_path, options.device, options.rerank_clip, **decoding.overrides_from(options)
    )
    paths, empty = files_and_folders(options.paths)
    no_images = f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder"
    engine = captioner.engine(batch_size=options.batch_size, decode_threads=options.decode_threads)
    failed = 0
    for prediction in itertools.chain(engine.predictions(paths), (Prediction.failed(f, no_images) for f in empty)):
        failed += prediction.error is not None
        print(json.dumps(prediction.row(), ensure_ascii=False) if options.json else shown(prediction))
    print(f"{len(paths) + len(empty) - failed} captioned, {failed} failed", file=sys.stderr)
    return 1 if failed else 0


def shown(prediction) -> str:
    """One image's answer as `caption` prints it: its caption, or its ranked alternatives, or its error."""

    def marked(entry) -> str:
        return "" if entry.get("constraints_met") is not False else "  [forced words not all met]"

    if prediction.error:
        return f"{prediction.image}: ERROR {prediction.error}"
    if prediction.alternatives is not None:
        ranked = [
            f"  {rank}. {entry['caption']}  ({entry['score']:.3f}){marked(entry)}"
            for rank, entry in enumerate(prediction.alternatives, 1)
        ]
        return "\n".join([f"{prediction.image}:", *ranked])
    return f"{prediction.image}: {prediction.caption}{marked({'constraints_met': prediction.constraints_met})}"


# The commands of captioner's own (name: module, function, what it does); any other goes to LightningCLI. Each
# module also has `<name>_parser()`, its options (`command_parser`; the manual's reference is made from them).
COMMANDS = {
    "caption": ("captioner.cli", "caption_command", "caption image files or folders, printed (or --json)"),
    "caption-set": (
        "captioner.bulk.command",
        "caption_set_command",
        "caption a whole set (folders, file lists, shards) as one resumable, distributed job",
    ),
    "serve": ("captioner.serve", "serve_command", "serve a model over HTTP: an API with dynamic batching and a page"),
    "export": ("captioner.export.onnx", "export_command", "export a checkpoint to ONNX: captions without torch"),
    "publish": (
        "captioner.publish",
        "publish_command",
        "a checkpoint as safetensors, config, tokenizer and a measured model card",
    ),
    "evaluate": ("captioner.evaluation.evaluate", "evaluate_command", "score a captions file against references"),
    "configs": ("captioner.shipped", "configs_command", "list the shipped configs (--config demo, ...)"),
}


def command_parser(name: str) -> argparse.ArgumentParser:
    """The options of one of captioner's own commands (`COMMANDS`), from its module's `<name>_parser()`."""
    module, _, _ = COMMANDS[name]
    return getattr(importlib.import_module(module), f"{name.replace('-', '_')}_parser")()


LIGHTNING_COMMANDS = {
    "fit": "train (then test the best checkpoint)",
    "validate": "score a checkpoint on the validation images",
    "test": "score a checkpoint on the test images (the COCO suite, written to test_metrics.json)",
    "predict": "caption a folder into the run folder (predictions.jsonl and .csv)",
}


def command_overview() -> str:
    """What `python -m captioner` (alone, or with --help) prints: every command and what it does."""
    rows = [*LIGHTNING_COMMANDS.items(), *((name, about) for name, (_, _, about) in COMMANDS.items())]
    width = max(len(name) for name, _ in rows)
    lines = [f"  {name.ljust(width)}  {about}" for name, about in rows]
    return "\n".join(
        [
            "usage: python -m captioner COMMAND [options]   (COMMAND --help for its options)",
            "",
            "Training and evaluation (LightningCLI: --config FILE, --model.*, --data.*, --trainer.*):",
            *lines[:4],
            "",
            "Using a trained model:",
            *lines[4:],
            "",
            "Start with: python -m captioner fit --config demo   (offline, on generated scenes)",
        ]
    )


def main(args: list[str] | None = None) -> CaptionerCLI | None:
    """Run the command line with `args` (default: `sys.argv[1:]`).

    Captioner's own commands (`COMMANDS`: caption, serve, export, ...) go to their functions; every other
    subcommand goes to LightningCLI. Expected faults (bad data, missing files, no network)
    end with one message and exit status 2 instead of a traceback.

    Returns:
        The CLI object, whose `trainer`, `model` and `datamodule` scripts and tests can inspect.
    """
    _configure_logging()
    compat.install()
    argv = sys.argv[1:] if args is None else list(args)
    try:
        if argv[:1] in ([], ["-h"], ["--help"]):
            print(command_overview())
            return None
        if argv[0] in COMMANDS:
            module, function, _ = COMMANDS[argv[0]]
            status = getattr(importlib.import_module(module), function)(argv[1:])
            if isinstance(status, int) and status:  # an exit status (some commands return what they did)
                raise SystemExit(status)
            return None
        argv = with_shipped_configs(argv)  # `--config demo` means the shipped demo config
        argv = upgraded_arguments(argv)  # older captioners' keys, in today's places (one line each)
        if args is None:
            sys.argv[1:] = argv  # LightningCLI reads the command line itself (and warns when given both)
        cli = CaptionerCLI(
            CaptionModel,
            CaptionDataModule,
            save_config_callback=RunConfigSaver,
            save_config_kwargs={"overwrite": True},
            # In every run, whatever the config lists (PublishedModel after TestReport: it reads the report).
            trainer_defaults={"callbacks": [TestReport(), PublishedModel(), ResumableRun()]},
            args=None if args is None else argv,
            auto_configure_optimizers=False,
        )
        _finish_wandb_runs(cli.trainer)
        return cli
    except CaptionerError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except SIGTERMException:
        print(
            "Stopped on request (SIGTERM, or Ctrl-C) after the current training step; last.ckpt holds it: "
            "continue with `fit --ckpt_path last` (same config).",
            file=sys.stderr,
        )
        raise SystemExit(143) from None
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        print(
            f"error: no space left on device while writing {error.filename or 'a file'}. Files are written to a "
            "temporary name and renamed when complete, so nothing partial is left that a later run would trust. "
            "Free some space and rerun (`fit --ckpt_path last` resumes training).",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
