"""captioner: image captioning experiments on PyTorch Lightning.

`Captioner` (torch) is imported on first use, so `captioner.inference.OnnxCaptioner` (ONNX Runtime, NumPy and
Pillow only) imports on machines without torch.

Layers, lowest first: a module imports only its own layer's modules and lower layers'
(tests/test_layers.py reads every import, lazy, relative and by name, and holds the code and the README to
this map):

    core                    foundations: errors, files, parts, pixels, pipeline, hardware, hub, version
    compat                  older versions' names, options and files, read into today's
    jobs                    the part engine: claims with leases, a job's state
    sources                 where images and captions are read from: records, image folders, shards, parts
    text                    tokenizers: words, BPE, a pretrained language model's; caption styles
    decoding                the one search, its rules and settings, answers, the confidence
    encoders                image encoders and their one preprocessing definition
    evaluation              metrics, CHAIR, CLIPScore, the test report
    features                feature stores and extraction
    data                    caption formats, splits, preparation, the datamodule
    models                  decoders, objectives, CaptionModel, checkpoints
    published               reading a published model
    inference               the Python API and the captioning engine
    export                  ONNX export
    publish                 writing a published model
    runs, render, shipped   run folders, pictures, the shipped configs
    callbacks               Lightning callbacks
    serve                   the HTTP server
    bulk                    caption-set
    cli, __main__           the command line
"""

from captioner.compat.names import install_moved_modules
from captioner.core.errors import CaptionerError
from captioner.core.version import __version__
from captioner.decoding.answers import Prediction

__all__ = ["Captioner", "CaptionerError", "OnnxCaptioner", "Prediction", "__version__", "load_captioner"]

install_moved_modules()  # older module names (captioner.errors, captioner.runtime, ...) keep working


def __getattr__(name: str):
    if name in ("Captioner", "OnnxCaptioner", "load_captioner"):
        import captioner.inference

        return getattr(captioner.inference, name)
    raise AttributeError(f"module 'captioner' has no attribute {name!r}")
