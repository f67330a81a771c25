"""The report: the tables of figures against their baselines, and the JSON of every figure."""

from __future__ import annotations

import json
from pathlib import Path


def _figure(r: dict, phase: str, metric: str) -> float | None:
    """A phase's figure, or None when the phase could not run here."""
    return r.get(phase, {}).get(metric)


def _why_missing(r: dict, phase: str) -> str:
    return r.get(phase, {}).get("unsupported", "not run")


# (title, left column, right column, rows of (label, left phase, right phase, metric))
SECTIONS = (
    (
        "against the original approach",
        "captioner",
        "original",
        (
            ("extraction (images/s)", "extract", "orig_extract", "images_per_s"),
            ("training (captions/s)", "train", "orig_train", "captions_per_s"),
            ("training, read from disk (captions/s)", "train_disk", "orig_train", "captions_per_s"),
            ("greedy decoding (captions/s)", "greedy", "orig_decode", "captions_per_s"),
            ("beam-3 decoding (captions/s)", "beam3", "orig_decode", "captions_per_s"),
            ("beam-5 decoding (captions/s)", "beam5", "orig_decode", "captions_per_s"),
            ("beam-3, 4x batch (captions/s)", "beam3_wide", "orig_decode", "captions_per_s"),
            ("greedy, compiled step (captions/s)", "greedy_compiled", "orig_decode", "captions_per_s"),
            ("beam-3, compiled step (captions/s)", "beam3_compiled", "orig_decode", "captions_per_s"),
            ("greedy, bf16 autocast (captions/s)", "greedy_bf16", "orig_decode", "captions_per_s"),
        ),
    ),
    (
        "constrained decoding against unconstrained (LSTM)",
        "constrained",
        "plain",
        (("beam-3 decoding (captions/s)", "beam3_forced", "beam3", "captions_per_s"),),
    ),
    (
        "Transformer (grid) against the LSTM (pooled), same images",
        "Transformer",
        "LSTM",
        (
            ("training (captions/s)", "train_transformer", "train_small", "captions_per_s"),
            ("training, grid read from disk (c./s)", "train_transformer_disk", "train_small", "captions_per_s"),
            (
                "training, per-image items (capt./s)",
                "train_transformer_per_image",
                "train_small_per_image",
                "captions_per_s",
            ),
            ("beam-3 decoding (captions/s)", "beam3_transformer", "beam3_lstm_same", "captions_per_s"),
            ("training, 512 wide (captions/s)", "train_transformer-512", "train_small", "captions_per_s"),
            ("beam-3, 512 wide (captions/s)", "beam3_transformer-512", "beam3_lstm_same", "captions_per_s"),
        ),
    ),
    (
        "prefix GPT-2 (12 x 768, 50,259 tokens, prefix 40) against the LSTM",
        "prefix LM",
        "LSTM",
        (
            ("training, LM frozen (captions/s)", "train_prefix-frozen", "train_small", "captions_per_s"),
            ("training, LM trained (captions/s)", "train_prefix-trained", "train_small", "captions_per_s"),
            ("beam-3 decoding (captions/s)", "beam3_prefix", "beam3_lstm_same", "captions_per_s"),
        ),
    ),
    (
        "prefix GPT-2 against the Transformer (256 wide)",
        "prefix LM",
        "Transformer",
        (
            ("training, LM frozen (captions/s)", "train_prefix-frozen", "train_transformer", "captions_per_s"),
            ("training, LM trained (captions/s)", "train_prefix-trained", "train_transformer", "captions_per_s"),
            ("beam-3 decoding (captions/s)", "beam3_prefix", "beam3_transformer", "captions_per_s"),
        ),
    ),
    (
        "streamed feature shards (LitData) against the memory-mapped cache",
        "streamed",
        "cache",
        (
            ("training, per-caption items (capt./s)", "train_streamed", "train_per_caption_disk", "captions_per_s"),
            ("extraction, tar shards vs folder (img/s)", "extract_shards", "extract", "images_per_s"),
        ),
    ),
    (
        "image encoders, extraction against the ResNet50 default",
        "encoder",
        "ResNet50",
        (
            ("timm convnext_tiny (images/s)", "extract_timm_convnext_tiny", "extract", "images_per_s"),
            ("OpenCLIP ViT-B-32 (images/s)", "extract_open_clip_vit_b32", "extract", "images_per_s"),
            ("HF DINOv2-small (images/s)", "extract_hf_dinov2_small", "extract", "images_per_s"),
        ),
    ),
    (
        "encoder fine-tuned from images, against frozen on cached features",
        "tuned",
        "frozen",
        (("ResNet18 112 px + LSTM (captions/s)", "train_encoder_tuned", "train_encoder_frozen", "captions_per_s"),),
    ),
    (
        "Transformer greedy decoding of 20 words",
        "kv cache",
        "recomputed",
        (("captions/s", "prefix_cached", "prefix_recomputed", "captions_per_s"),),
    ),
    (
        "exported, ONNX Runtime (CPU), against the original approach",
        "ONNX",
        "original",
        (
            ("extraction fp32 (images/s)", "onnx_extract_fp32", "orig_extract", "images_per_s"),
            ("extraction int8 dynamic (images/s)", "onnx_extract_int8-all", "orig_extract", "images_per_s"),
            ("extraction int8 static (images/s)", "onnx_extract_int8-static", "orig_extract", "images_per_s"),
            ("greedy fp32 (captions/s)", "onnx_greedy_fp32", "orig_decode", "captions_per_s"),
            ("greedy int8 (captions/s)", "onnx_greedy_int8", "orig_decode", "captions_per_s"),
            ("beam-3 fp32 (captions/s)", "onnx_beam3_fp32", "orig_decode", "captions_per_s"),
            ("beam-3 int8 (captions/s)", "onnx_beam3_int8", "orig_decode", "captions_per_s"),
        ),
    ),
    (
        "exported, ONNX Runtime, against PyTorch",
        "ONNX",
        "PyTorch",
        (
            ("extraction fp32 (images/s)", "onnx_extract_fp32", "extract", "images_per_s"),
            ("extraction int8 dynamic (images/s)", "onnx_extract_int8-all", "extract", "images_per_s"),
            ("extraction int8 static (images/s)", "onnx_extract_int8-static", "extract", "images_per_s"),
            ("greedy int8 (captions/s)", "onnx_greedy_int8", "greedy", "captions_per_s"),
            ("beam-3 int8 (captions/s)", "onnx_beam3_int8", "beam3", "captions_per_s"),
        ),
    ),
    (
        "exported prefix decoder: Llama (grouped-query attention) against GPT-2, same size",
        "Llama",
        "GPT-2",
        (("greedy, 20 words (captions/s)", "onnx_lm_llama", "onnx_lm_gpt2", "captions_per_s"),),
    ),
    (
        "serving, same images",
        "server",
        "API",
        (
            ("32 clients vs batches (images/s)", "server", "api", "images_per_s"),
            ("one request vs the model (ms)", "server", "api", "single_ms"),
            ("the server's own time for it (ms)", "server", "api", "model_ms"),
            ("overhead per request (ms)", "server", "-", "overhead_ms"),
        ),
    ),
    (
        "bulk captioning (caption-set) against Captioner on the same files",
        "job",
        "Captioner",
        (
            ("one process (images/s)", "bulk_job_1", "bulk_captioner", "images_per_s"),
            ("two processes (images/s)", "bulk_job_2", "bulk_captioner", "images_per_s"),
            ("while captioning (images/s)", "bulk_job_1", "bulk_captioner", "captioning_images_per_s"),
            ("model waiting for images (share)", "bulk_job_1", "bulk_captioner", "model_waited_share"),
        ),
    ),
)
TABLE = SECTIONS[0][3]


def print_report(r: dict, sizes: dict, images: int, hardware: str, json_path: Path | None) -> None:
    """The table, memory lines and `name: value` summary; a phase that could not run says why, the rest print."""
    summary: dict[str, object] = {"hardware": hardware}
    for title, left, right, rows in SECTIONS:
        print(f"\n{title}\n{'phase':<36}{left:>14}{right:>14}{'ratio':>10}")
        for label, ours, other, metric in rows:
            mine, theirs = _figure(r, ours, metric), _figure(r, other, metric)
            summary[f"{ours}_{metric}"] = mine
            if mine is None:
                print(f"{label:<36}  {_why_missing(r, ours)}")
                continue
            ratio = mine / theirs if theirs else None
            summary[f"{ours}_{metric}_vs_{other}"] = ratio  # a phase may be compared with several others
            shown = f"{theirs:>14,.2f}{ratio:>9.2f}x" if ratio is not None else f"{'-':>14}"
            print(f"{label:<36}{mine:>14,.1f}{shown}")
    print(f"\n{'peak memory (MB): anon / resident':<44}{'captioner':>18}{'original':>18}")
    for label, ours, original in (
        ("extraction", "extract", "orig_extract"),
        ("training", "train", "orig_train"),
        ("decoding (greedy)", "greedy", "orig_decode"),
    ):
        cells = []
        for phase in (ours, original):
            anon, rss = _figure(r, phase, "peak_anon_mb"), _figure(r, phase, "peak_rss_mb")
            cells.append(f"{anon:>9.0f} /{rss:>6.0f}" if anon is not None else f"{'-':>16}")
        print(f"{label:<44}{cells[0]:>18}{cells[1]:>18}")
    for label, small, large, counts in (
        ("training anon memory", "train_small", "train", (sizes["train_small"], sizes["train_large"])),
        ("extraction anon memory", "extract_half", "extract", (images // 2, images)),
    ):
        a, b = _figure(r, small, "peak_anon_mb"), _figure(r, large, "peak_anon_mb")
        if a is not None and b is not None:
            print(f"{label}, {counts[0]:,} vs {counts[1]:,} images: {a:.0f} MB vs {b:.0f} MB")
            summary[f"{large}_peak_anon_mb_small"], summary[f"{large}_peak_anon_mb_large"] = a, b
    records = sorted(
        (phase["records"], phase) for key, phase in r.items() if key.startswith("records_") and "records" in phase
    )
    for count, phase in records:
        print(
            f"records pass, {count:,} captions-only records: {phase['seconds']:.1f} s, peak memory "
            f"+{phase['peak_rise_mb']:.0f} MB"
        )
        summary[f"records_{count}_seconds"], summary[f"records_{count}_peak_rise_mb"] = (
            phase["seconds"],
            phase["peak_rise_mb"],
        )
    if json_path:
        json_path.write_text(json.dumps({"summary": summary, "phases": r}, indent=1))
    print()
    for key, value in summary.items():
        print(f"{key}: {value:.2f}" if isinstance(value, float) else f"{key}: {value}")
