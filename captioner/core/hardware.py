"""What this machine's processors can run, detected rather than assumed, and the precision that follows.

Three facts shape every hardware path:

- CPUs differ. bf16 runs natively on CPUs with AVX-512 BF16 or AMX (recent
  Xeons, AMD Zen 4 and later); oneDNN emulates it on other AVX-512 CPUs (slower
  than fp32) and cannot run some bf16 primitives at all on AVX2-only CPUs (its
  LSTM fails with "could not create a primitive descriptor"). So bf16 on a CPU
  is used only where it is native, and falls back to fp32 with one warning.
- GPUs differ. bf16 autocast is native from compute capability 8.0 (Ampere);
  older GPUs get fp16 mixed precision with a gradient scaler.
- Asking CUDA about a device initialises it in the launching process, which
  fork-based strategies (`ddp_fork`, `ddp_notebook`) then refuse. The compute
  capability is read through NVML instead (the driver's management library,
  which does not touch the CUDA context), as `torch.cuda.device_count` does.
"""

from __future__ import annotations

import ctypes
import logging
import os
from typing import Literal

import torch

log = logging.getLogger("captioner")

CpuBf16 = Literal["native", "emulated", "none"]
BF16_PRECISIONS = ("bf16-mixed", "bf16-true", "bf16")
FALLBACK_PRECISION = "32-true"
CPU_BF16_REQUIREMENT = "AVX-512 BF16 or AMX (e.g. Intel Sapphire Rapids and later, AMD Zen 4 and later)"


def cpu_bf16_support() -> CpuBf16:
    """How this CPU runs bf16: "native" (AVX-512 BF16 or AMX), "emulated" (other AVX-512) or "none" (AVX2 and older)."""
    cpu = getattr(torch, "cpu", None)
    try:
        if cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported():
            return "native"
    except AttributeError:  # an older torch without the probes
        pass
    try:
        return "emulated" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "none"
    except (AttributeError, RuntimeError):
        return "none"


def describe_cpu() -> str:
    """The CPU's model name, core count and bf16 support, for reports."""
    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            name = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores, bf16 {cpu_bf16_support()}"


def cuda_compute_capabilities() -> list[tuple[int, int]] | None:
    """The compute capability of every NVIDIA GPU, read through NVML without initialising CUDA.

    Returns:
        One `(major, minor)` per GPU, or None when NVML cannot be loaded or asked (no NVIDIA driver).
    """
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    if nvml.nvmlInit_v2() != 0:
        return None
    try:
        count = ctypes.c_uint()
        if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
            return None
        capabilities = []
        for index in range(count.value):
            handle, major, minor = ctypes.c_void_p(), ctypes.c_int(), ctypes.c_int()
            if nvml.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(handle)) != 0:
                return None
            if nvml.nvmlDeviceGetCudaComputeCapability(handle, ctypes.byref(major), ctypes.byref(minor)) != 0:
                return None
            capabilities.append((major.value, minor.value))
        return capabilities
    finally:
        nvml.nvmlShutdown()


def runs_on_cuda(accelerator: str | None) -> bool:
    """Whether a Trainer with this `accelerator` setting will run on CUDA (checked without initialising it)."""
    name = str(accelerator or "auto").lower()
    if name in ("cuda", "gpu"):
        return True
    return name == "auto" and torch.cuda.is_available()


def default_precision(accelerator: str | None) -> str:
    """The training precision for the accelerator actually used, when the config sets none.

    CUDA: "bf16-mixed" on compute capability 8.0 and newer, "16-mixed" (with a
    gradient scaler) on older GPUs, "32-true" when NVML cannot say. CPU and
    anything else: "32-true" (bf16 changes results and is not faster for
    training this model on a CPU).
    """
    if not runs_on_cuda(accelerator):
        return FALLBACK_PRECISION
    capabilities = cuda_compute_capabilities()
    if not capabilities:
        log.info(
            "Could not read the GPUs' compute capability through NVML: training in fp32 "
            "(set --trainer.precision bf16-mixed on Ampere or newer GPUs)."
        )
        return FALLBACK_PRECISION
    return "bf16-mixed" if min(capabilities) >= (8, 0) else "16-mixed"


def checked_precision(precision: str | int | None, accelerator: str | None) -> str | int:
    """The precision to run with: `precision` as configured, or the default; bf16 on a CPU only where it is native.

    A bf16 precision on a CPU without native bf16 falls back to fp32 with one
    warning naming the CPU features it needs, instead of failing inside oneDNN
    (AVX2 CPUs) or running slower than fp32 (emulated on other AVX-512 CPUs).
    """
    if precision is None:
        return default_precision(accelerator)
    if str(precision) in BF16_PRECISIONS and not runs_on_cuda(accelerator):
        support = cpu_bf16_support()
        if support != "native":
            log.warning(
                "--trainer.precision %s: this CPU has no native bf16 (it needs %s; here bf16 is %s), so the run "
                "uses fp32 instead.",
                precision,
                CPU_BF16_REQUIREMENT,
                "emulated and slower than fp32" if support == "emulated" else "not supported by oneDNN",
            )
            return FALLBACK_PRECISION
    return precision


def bf16_autocast_available(device: torch.device | str) -> bool:
    """Whether bf16 autocast runs natively on `device` (a CUDA device of capability 8.0+, or a CPU with native bf16)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and cpu_bf16_support() == "native"
