"""The benchmark reports what the machine cannot run and still prints every other row."""

import sys

import numpy as np

from captioner.core import hardware
from tests.conftest import TESTS

sys.path.insert(0, str(TESTS.parent / "scripts"))
import benchmark  # noqa: E402
from bench import report  # noqa: E402


def test_a_phase_this_cpu_cannot_run_is_reported_and_the_rest_still_print(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(hardware, "cpu_bf16_support", lambda: "none")  # an AVX2-only CPU
    features = tmp_path / "features.npy"
    np.save(features, np.random.default_rng(0).standard_normal((4, 2048)).astype(np.float16))
    skipped = benchmark.ours_decode(str(features), count=4, device="cpu", beam_size=1, batch_size=4, bf16=True)
    assert skipped == {"unsupported": f"not supported on this CPU (bf16 needs {hardware.CPU_BF16_REQUIREMENT})"}

    phase = {"captions_per_s": 100.0, "images_per_s": 10.0, "peak_anon_mb": 1.0, "peak_rss_mb": 2.0}
    names = (
        "extract",
        "extract_half",
        "orig_extract",
        "train",
        "train_disk",
        "train_small",
        "orig_train",
        "greedy",
        "beam3",
        "orig_decode",
    )
    results = {name: dict(phase) for name in names}
    results["greedy_bf16"] = skipped
    benchmark.print_report(results, {"train_small": 4, "train_large": 8}, 8, "test CPU", tmp_path / "out.json")
    out = capsys.readouterr().out
    assert "greedy, bf16 autocast (captions/s)    not supported on this CPU" in out
    for label, *_ in report.TABLE[:4]:
        assert f"{label:<36}" in out and "1.00x" in out.split(label)[1].splitlines()[0]
    assert "greedy_bf16_captions_per_s: None" in out and (tmp_path / "out.json").is_file()
