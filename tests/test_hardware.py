"""Hardware paths checked on the CPU: precision, optimizer and clipping, autocast dtypes, bf16 detection, fallback.

GPU-only behaviour is reproduced here through the same code with the
device-specific rule simulated; tests/test_gpu.py runs the real thing on a GPU.
"""

import ctypes
import functools
import logging
import weakref

import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn

from captioner.cli import main
from captioner.core import hardware
from captioner.encoders.preprocessing import Preprocessing
from captioner.encoders.torchvision_models import TorchvisionEncoder
from captioner.features import extraction as features_module
from captioner.models.decoders import AttentionDecoder, LSTMDecoder
from captioner.models.decoders import lstm as decoder_module
from captioner.text.words import Vocabulary
from tests.conftest import tiny_args

NATIVE_BF16 = hardware.cpu_bf16_support() == "native"
needs_cpu_bf16 = pytest.mark.skipif(hardware.cpu_bf16_support() == "none", reason="oneDNN has no bf16 on this CPU")


# ---------------------------------------------------------------- optimizer and gradient clipping
def test_lightning_refuses_clipping_a_fused_optimizer_under_mixed_precision_and_ours_is_not_fused():
    """The GPU crash of `fit --config configs/default.yaml`, reproduced with the same plugin on the CPU."""
    plugin = MixedPrecision("bf16-mixed", "cpu")
    parameters = [nn.Parameter(torch.randn(3))]
    parameters[0].grad = torch.randn(3)
    fused = torch.optim.AdamW(parameters, fused=True)
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        plugin.clip_gradients(fused, clip_val=5.0)

    from captioner.models.module import CaptionModel

    model = CaptionModel(
        functools.partial(LSTMDecoder, embed_dim=8, hidden_dim=8), encoder=TorchvisionEncoder("resnet18", None, 32)
    )
    model.build(Vocabulary(["a", "b"], max_length=4))

    class TrainerStub:
        estimated_stepping_batches = 10
        gradient_clip_val = 5.0

    model.trainer = TrainerStub()
    optimizer = model.configure_optimizers()["optimizer"]
    for parameter in model.decoder.parameters():
        parameter.grad = torch.zeros_like(parameter)
    plugin.clip_gradients(optimizer, clip_val=5.0)  # accepted: not fused
    TrainerStub.gradient_clip_val = None
    assert model.configure_optimizers()["optimizer"].defaults["fused"]  # fused when nothing is clipped


@needs_cpu_bf16
def test_bf16_mixed_training_with_clipping_runs(scenes, tmp_path, monkeypatch):
    monkeypatch.setattr(hardware, "cpu_bf16_support", lambda: "native")  # run bf16 even where it is emulated
    cli = main(
        tiny_args(
            "fit",
            scenes,
            tmp_path / "work",
            tmp_path,
            "--trainer.precision",
            "bf16-mixed",
            "--trainer.gradient_clip_val",
            "5.0",
            "--trainer.max_steps",
            "2",
            "--trainer.limit_val_batches",
            "1",
        )
    )
    assert cli.trainer.precision == "bf16-mixed" and cli.trainer.global_step == 2


# ---------------------------------------------------------------- what each decoder computes in
def _dtypes_under_autocast(decoder: nn.Module, features: torch.Tensor) -> dict[str, torch.dtype]:
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen.setdefault(name, (output[0] if isinstance(output, tuple) else output).dtype)

        return hook

    hooks = [
        module.register_forward_hook(record(name))
        for name, module in decoder.named_modules()
        if isinstance(module, (nn.LSTM, nn.LSTMCell, nn.Linear))
    ]
    tokens = torch.randint(4, 20, (2, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        decoder(features, tokens)
    for hook in hooks:
        hook.remove()
    return seen


@needs_cpu_bf16
def test_the_lstm_runs_in_float32_where_autocast_would_force_float16_and_in_bf16_on_a_cpu(monkeypatch):
    lstm = LSTMDecoder(24, feature_dim=16, embed_dim=8, hidden_dim=12).eval()
    features = torch.randn(2, 16)
    assert _dtypes_under_autocast(lstm, features) == {
        "init_state_proj": torch.bfloat16,
        "lstm": torch.bfloat16,
        "head": torch.bfloat16,
    }
    # CUDA's autocast rule casts cuDNN RNNs to float16; simulate it on the CPU: the LSTM must then run in float32.
    monkeypatch.setattr(decoder_module, "RNN_AUTOCAST_FORCES_HALF", {"cpu"})
    dtypes = _dtypes_under_autocast(lstm, features)
    assert dtypes["lstm"] == torch.float32 and dtypes["head"] == torch.bfloat16
    # The attention decoder's LSTMCell is a pair of matrix products: bf16 for real, under either rule.
    attention = AttentionDecoder(24, feature_dim=16, embed_dim=8, hidden_dim=12, attention_dim=6).eval()
    assert _dtypes_under_autocast(attention, torch.randn(2, 4, 16))["cell"] == torch.bfloat16


# ---------------------------------------------------------------- precision defaults and CPU detection
def test_the_default_precision_follows_the_accelerator_actually_used(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(hardware, "cuda_compute_capabilities", lambda: [(9, 0)])
    assert hardware.default_precision("auto") == hardware.default_precision("gpu") == "bf16-mixed"
    assert hardware.default_precision("cpu") == "32-true"  # a GPU on the machine does not matter here
    monkeypatch.setattr(hardware, "cuda_compute_capabilities", lambda: [(8, 0), (7, 5)])
    assert hardware.default_precision("auto") == "16-mixed"  # one pre-Ampere GPU: fp16 with a gradient scaler
    monkeypatch.setattr(hardware, "cuda_compute_capabilities", lambda: None)
    assert hardware.default_precision("auto") == "32-true"
    assert hardware.checked_precision("16-mixed", "gpu") == "16-mixed"  # what the config says stays


def test_compute_capability_is_read_through_nvml_not_cuda(monkeypatch):
    class FakeNvml:  # answers with NVML's own function names
        def __init__(self):
            self.shut = False

        def nvmlInit_v2(self):  # noqa: N802
            return 0

        def nvmlDeviceGetCount_v2(self, count):  # noqa: N802
            ctypes.cast(count, ctypes.POINTER(ctypes.c_uint))[0] = 2
            return 0

        def nvmlDeviceGetHandleByIndex_v2(self, index, handle):  # noqa: N802
            ctypes.cast(handle, ctypes.POINTER(ctypes.c_void_p))[0] = index + 1
            return 0

        def nvmlDeviceGetCudaComputeCapability(self, handle, major, minor):  # noqa: N802
            ctypes.cast(major, ctypes.POINTER(ctypes.c_int))[0] = 9 if handle.value == 1 else 8
            ctypes.cast(minor, ctypes.POINTER(ctypes.c_int))[0] = 0 if handle.value == 1 else 6
            return 0

        def nvmlShutdown(self):  # noqa: N802
            self.shut = True

    nvml = FakeNvml()
    monkeypatch.setattr(ctypes, "CDLL", lambda name: nvml if name == "libnvidia-ml.so.1" else None)
    assert hardware.cuda_compute_capabilities() == [(9, 0), (8, 6)] and nvml.shut
    monkeypatch.setattr(ctypes, "CDLL", lambda name: (_ for _ in ()).throw(OSError("no driver")))
    assert hardware.cuda_compute_capabilities() is None


def test_the_cli_never_initialises_cuda(scenes, tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("CUDA was initialised by the launcher")

    for name in ("is_bf16_supported", "get_device_capability", "get_device_properties", "current_device", "init"):
        monkeypatch.setattr(torch.cuda, name, forbidden)
    cli = main(tiny_args("fit", scenes, tmp_path / "work", tmp_path, "--trainer.fast_dev_run", "true"))
    assert cli.trainer.precision == "32-true"


def test_bf16_on_a_cpu_without_it_falls_back_to_fp32_with_one_warning(
    trained, scenes_source, tmp_path, monkeypatch, caplog
):
    checkpoint, work = trained
    monkeypatch.setattr(hardware, "cpu_bf16_support", lambda: "none")  # an AVX2-only CPU
    with caplog.at_level(logging.WARNING, logger="captioner"):
        cli = main(
            tiny_args(
                "test",
                scenes_source,
                work,
                tmp_path,
                "--ckpt_path",
                str(checkpoint),
                "--trainer.precision",
                "bf16-mixed",
            )
        )
    assert cli.trainer.precision == "32-true" and "test/bleu4" in cli.trainer.callback_metrics
    warnings = [r.getMessage() for r in caplog.records if "no native bf16" in r.getMessage()]
    assert len(warnings) == 1 and "AVX-512 BF16 or AMX" in warnings[0]
    monkeypatch.setattr(hardware, "cpu_bf16_support", lambda: "native")
    assert hardware.checked_precision("bf16-mixed", "cpu") == "bf16-mixed"


def test_cpu_bf16_detection_reads_the_cpu(monkeypatch):
    """Each answer from the probes that tell it: native bf16 (AVX-512 BF16 or AMX), AVX-512 that oneDNN emulates bf16
    on, and neither (AVX2 only); and an older torch without the probes."""
    probes = {"avx512_bf16": False, "amx": False, "mkldnn": False}
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: probes["avx512_bf16"])
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: probes["amx"])
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: probes["mkldnn"], raising=False)
    assert hardware.cpu_bf16_support() == "none"
    probes["mkldnn"] = True
    assert hardware.cpu_bf16_support() == "emulated"
    probes["amx"] = True
    assert hardware.cpu_bf16_support() == "native"
    probes.update(amx=False, avx512_bf16=True)
    assert hardware.cpu_bf16_support() == "native"
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    probes["mkldnn"] = False
    assert hardware.cpu_bf16_support() == "none"


# ---------------------------------------------------------------- out of memory
def test_out_of_memory_frees_the_failed_chunk_before_the_cache_is_emptied(monkeypatch):
    held = []

    def forward(images):
        if len(images) > 2:
            activation = torch.ones(1000)
            held.append(weakref.ref(activation))
            raise torch.OutOfMemoryError("simulated")
        return images.float().mean(dim=(1, 2, 3), keepdim=False).unsqueeze(1)

    alive_when_freeing = []
    monkeypatch.setattr(
        features_module,
        "free_device_memory",
        lambda device: alive_when_freeing.append(any(ref() is not None for ref in held)),
    )
    out = features_module.encode_in_chunks(forward, torch.zeros(8, 3, 4, 4, dtype=torch.uint8), [8])
    assert out.shape == (8, 1) and alive_when_freeing == [False, False]


def test_preprocessing_round_trips_and_refuses_what_it_does_not_know():
    spec = Preprocessing(224)
    assert Preprocessing.from_dict(spec.to_dict()) == spec
    from captioner.core.errors import CaptionerError

    with pytest.raises(CaptionerError, match="another version"):
        Preprocessing.from_dict({**spec.to_dict(), "version": 99})
    with pytest.raises(CaptionerError, match="resize='crop'"):
        Preprocessing(224, resize="crop")
