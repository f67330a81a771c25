"""The prefix decoder over a causal LM: frozen or trained, pretrained weights from a local folder (the hub path,
offline), refusals with one clear line, and a run end to end (BPE, teacher forcing, self-critical, a checkpoint
captioning with no network). Its conformance with the decoder protocol and search is in test_decoder.py,
test_search.py and test_export.py."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from PIL import Image

from captioner import Captioner
from captioner.core.errors import CaptionerError
from captioner.models.decoders import PrefixLMDecoder
from captioner.models.objectives import caption_cross_entropy
from captioner.text import Pretrained
from tests.conftest import tiny_args, write_gpt2_like_tokenizer

TINY_GPT2 = {"model_type": "gpt2", "n_layer": 2, "n_embd": 16, "n_head": 2, "n_positions": 64}


def decoder(**options) -> PrefixLMDecoder:
    torch.manual_seed(0)
    settings = {"lm": None, "lm_config": TINY_GPT2, "prefix_length": 2} | options
    return PrefixLMDecoder(40, 8, **settings)


def one_step(model: PrefixLMDecoder) -> None:
    groups = model.parameter_groups(0.05)
    optimizer = torch.optim.SGD(groups, lr=0.05)
    tokens = torch.randint(3, 40, (4, 6))
    output = model(torch.randn(4, 8), tokens[:, :-1])
    caption_cross_entropy(output.logits, tokens[:, 1:], 0).backward()
    optimizer.step()


def test_a_frozen_lm_stays_as_it_was_and_only_the_mapper_learns():
    model = decoder().train()
    assert not model.lm.training and model.mapper.training  # frozen: no dropout in the LM
    lm_before = {k: v.clone() for k, v in model.lm.state_dict().items()}
    mapper_before = {k: v.clone() for k, v in model.mapper.state_dict().items()}
    one_step(model)
    assert all(torch.equal(lm_before[k], v) for k, v in model.lm.state_dict().items())
    assert any(not torch.equal(mapper_before[k], v) for k, v in model.mapper.state_dict().items())
    trained_ids = {id(p) for group in model.parameter_groups(1.0) for p in group["params"]}
    assert not trained_ids & {id(p) for p in model.lm.parameters()}


def test_a_trained_lm_learns_at_its_own_rate():
    model = decoder(train_lm=True, lm_lr=1e-4).train()
    assert model.lm.training
    groups = model.parameter_groups(0.05)
    assert [g["lr"] for g in groups] == [0.05, 1e-4]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.lm.parameters()}
    before = model.lm.transformer.h[0].attn.c_attn.weight.clone()
    one_step(model)
    assert not torch.equal(before, model.lm.transformer.h[0].attn.c_attn.weight)


@pytest.fixture(scope="module")
def saved_lm(tmp_path_factory):
    """A small GPT-2 saved as the hub would give it (config, weights, tokenizer.json) in a local folder."""
    import tokenizers
    import transformers

    folder = tmp_path_factory.mktemp("tiny-gpt2")
    write_gpt2_like_tokenizer(folder / "tokenizer.json", ["a red circle on the left", "a blue square at the top"] * 20)
    tokenizer = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    torch.manual_seed(1)
    config = transformers.AutoConfig.for_model(**(TINY_GPT2 | {"vocab_size": tokenizer.get_vocab_size()}))
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def test_pretrained_weights_load_from_the_lm_folder_with_the_tokenizer_rows_added(saved_lm):
    import transformers

    tokenizer = Pretrained(str(saved_lm)).build([], max_length=10)
    model = PrefixLMDecoder(len(tokenizer), 8, lm=str(saved_lm), prefix_length=2)
    assert model.hparams.lm_config["n_embd"] == 16  # read from the folder and recorded for checkpoints
    saved = transformers.AutoModelForCausalLM.from_pretrained(saved_lm)
    own = saved.get_input_embeddings().weight
    assert not torch.equal(model.lm.get_input_embeddings().weight[: len(own)], own)  # random until training starts
    model.load_pretrained()
    embeddings = model.lm.get_input_embeddings().weight
    assert embeddings.shape[0] == len(tokenizer) == len(own) + 2
    assert torch.equal(embeddings[: len(own)], own)
    block = model.lm.transformer.h[1].mlp.c_fc.weight
    assert torch.equal(block, saved.transformer.h[1].mlp.c_fc.weight)
    # Rebuilt from its recorded options (as a checkpoint is), it needs neither the folder's config nor the hub.
    rebuilt = PrefixLMDecoder(len(tokenizer), 8, **model.spec()["init_args"])
    assert rebuilt.lm.get_input_embeddings().weight.shape == embeddings.shape


def test_a_pretrained_lm_refuses_another_tokenizer_saying_what_to_write(saved_lm):
    with pytest.raises(CaptionerError, match=r"has \d+ tokens but the tokenizer has 2000.*captioner\.text\.Pretrained"):
        PrefixLMDecoder(2000, 8, lm=str(saved_lm))
    PrefixLMDecoder(2000, 8, lm=str(saved_lm), pretrained=False)  # random weights take any tokenizer


def test_an_unknown_lm_offline_is_one_line_naming_the_cache():
    with pytest.raises(CaptionerError) as error:
        PrefixLMDecoder(40, 8, lm="no-such-org/no-such-lm")
    assert "models--no-such-org--no-such-lm" in str(error.value) and "\n" not in str(error.value)


def test_without_transformers_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(CaptionerError, match=r"pip install 'captioner\[hf\]'"):
        decoder()


def test_bad_options_are_refused_before_anything_is_built():
    with pytest.raises(CaptionerError, match="prefix_length"):
        decoder(prefix_length=0)
    with pytest.raises(CaptionerError, match="mapper_heads 3 must divide"):
        decoder(mapper="transformer", mapper_heads=3)
    with pytest.raises(CaptionerError, match="mapper: transformer"):
        decoder()(torch.randn(2, 4, 8), torch.randint(3, 40, (2, 3)))  # a grid through the MLP mapper


def test_a_prefix_run_end_to_end_with_bpe_then_self_critical(scenes_source, tmp_path):
    """Teacher forcing, then self-critical training from its checkpoint; the checkpoint then captions on its own."""
    from captioner.cli import main

    prefix = [
        "--model.decoder",
        "captioner.models.decoders.PrefixLMDecoder",
        "--model.decoder.lm",
        "null",
        "--model.decoder.lm_config",
        json.dumps(TINY_GPT2 | {"n_embd": 32}),
        "--model.decoder.prefix_length",
        "4",
        "--model.decoder.train_lm",
        "true",
        "--data.tokenizer",
        "captioner.text.Bpe",
        "--data.tokenizer.vocab_size",
        "400",
        "--model.lr",
        "0.003",
    ]
    work = tmp_path / "work"
    cli = main(tiny_args("fit", scenes_source, work, tmp_path / "xe", "--trainer.max_epochs", "3", *prefix))
    checkpoint = cli.trainer.checkpoint_callback.best_model_path
    loss = float(cli.trainer.callback_metrics["val/loss"])
    assert isinstance(cli.model.decoder, PrefixLMDecoder) and loss < 5.0  # log(400) = 6.0: it learned
    scst = main(
        tiny_args(
            "fit",
            scenes_source,
            work,
            tmp_path / "scst",
            "--trainer.max_epochs",
            "1",
            *prefix,
            "--model.objective",
            "captioner.models.objectives.SelfCritical",
            "--model.init_checkpoint",
            checkpoint,
            "--model.lr",
            "0.0005",
        )
    )
    assert "train/reward_cider" in scst.trainer.logged_metrics
    captioner = Captioner.from_checkpoint(scst.trainer.checkpoint_callback.last_model_path or checkpoint, device="cpu")
    images = sorted((scenes_source / "Images").iterdir())[:3]
    described = captioner.describe([Image.open(p) for p in images], num_return=2, num_beams=3)
    assert all(d["caption"] and d["attention"] is None and len(d["alternatives"]) == 2 for d in described)
    sampled = captioner.predict(images, do_sample=True, num_beams=1, seed=3, top_k=5)
    assert sampled == captioner.predict(images, do_sample=True, num_beams=1, seed=3, top_k=5)  # seeded sampling repeats


# A small random model of every decoder-only family the prefix decoder names (grouped-query attention in Llama's and
# Qwen2's: fewer key and value heads than query heads).
FAMILIES = {
    "gpt2": {"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64},
    "opt": {
        "model_type": "opt",
        "num_hidden_layers": 2,
        "hidden_size": 32,
        "num_attention_heads": 2,
        "ffn_dim": 64,
        "max_position_embeddings": 64,
        "word_embed_proj_dim": 32,
    },
    "gpt_neo": {
        "model_type": "gpt_neo",
        "num_layers": 2,
        "hidden_size": 32,
        "num_heads": 2,
        "attention_types": [[["global", "local"], 1]],
        "max_position_embeddings": 64,
        "window_size": 16,
    },
    "gpt_neox": {
        "model_type": "gpt_neox",
        "num_hidden_layers": 2,
        "hidden_size": 32,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
    },
    "llama": {
        "model_type": "llama",
        "num_hidden_layers": 2,
        "hidden_size": 32,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
    },
    "qwen2": {
        "model_type": "qwen2",
        "num_hidden_layers": 2,
        "hidden_size": 32,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
    },
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_language_model_family_trains_captions_and_exports_to_the_same_captions(family, tmp_path):
    import functools

    from captioner.decoding import DecodingConfig
    from captioner.export import export_onnx
    from captioner.inference import OnnxCaptioner
    from captioner.models.module import CaptionModel
    from captioner.text.words import Vocabulary
    from tests.plugins import TinyConvEncoder

    torch.manual_seed(0)
    factory = functools.partial(PrefixLMDecoder, lm=None, lm_config=FAMILIES[family], prefix_length=2, train_lm=True)
    model = CaptionModel(factory, encoder=TinyConvEncoder(width=8), decoding=DecodingConfig(num_beams=3))
    model.build(Vocabulary([f"w{i}" for i in range(30)], max_length=6))
    before = {name: value.clone() for name, value in model.decoder.lm.named_parameters()}
    optimizer = torch.optim.SGD(model.decoder.parameter_groups(0.05), lr=0.05)
    tokens = torch.randint(3, 30, (4, 6))
    output = model.decoder(torch.randn(4, 8), tokens[:, :-1])
    caption_cross_entropy(output.logits, tokens[:, 1:], 0).backward()
    optimizer.step()  # one training step: the language model itself moves
    assert any(not torch.equal(before[name], value) for name, value in model.decoder.lm.named_parameters())
    model.eval()
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    captions = [row["caption"] for row in Captioner(model).describe(list(images))]
    exported = OnnxCaptioner(export_onnx(model, tmp_path / family))
    assert [row["caption"] for row in exported.describe(list(images.numpy()))] == captions
    assert all(caption.split() for caption in captions)


# ------------------------------------------------------------ LoRA on the language model
def test_lora_trains_only_the_adapters_at_their_own_rate_and_changes_what_the_lm_says():
    model = decoder(train_lm="lora", lora_rank=2, lm_lr=1e-2).train()
    base = {k: v.clone() for k, v in model.lm.state_dict().items() if ".lora_" not in k}
    adapters = {k: v.clone() for k, v in model.lm.state_dict().items() if ".lora_" in k}
    assert adapters and all(".base_layer." in k for k in base if "c_attn" in k)  # GPT-2's default target: c_attn
    groups = model.parameter_groups(0.05)
    assert [g["lr"] for g in groups] == [0.05, 1e-2]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for n, p in model.lm.named_parameters() if ".lora_" in n}
    features, tokens = torch.randn(2, 8), torch.randint(3, 40, (2, 5))
    model.eval()
    untouched = model(features, tokens).logits  # B starts at zero: the adapted LM says what the frozen one says
    model.train()
    one_step(model)
    assert all(torch.equal(base[k], v) for k, v in model.lm.state_dict().items() if k in base)
    assert any(not torch.equal(adapters[k], v) for k, v in model.lm.state_dict().items() if k in adapters)
    model.eval()
    mapper_only = decoder(train_lm="lora", lora_rank=2)
    mapper_only.load_state_dict(
        {k: v for k, v in model.state_dict().items()}
        | {k: torch.zeros_like(v) for k, v in model.state_dict().items() if ".lora_B." in k}
    )
    assert not torch.allclose(model(features, tokens).logits, mapper_only(features, tokens).logits)
    assert untouched.shape == model(features, tokens).logits.shape


def test_lora_checkpoints_hold_the_adapters_and_export_merges_them_into_the_same_captions(tmp_path):
    import functools

    import onnx

    from captioner.decoding import DecodingConfig
    from captioner.export import export_onnx
    from captioner.inference import OnnxCaptioner
    from captioner.models.module import CaptionModel
    from captioner.text.words import Vocabulary
    from tests.plugins import TinyConvEncoder

    torch.manual_seed(0)
    factory = functools.partial(
        PrefixLMDecoder,
        lm=None,
        lm_config=FAMILIES["llama"],
        prefix_length=2,
        train_lm="lora",
        lora_rank=4,
        lora_targets=["q_proj", "v_proj", "o_proj"],
    )
    model = CaptionModel(factory, encoder=TinyConvEncoder(width=8), decoding=DecodingConfig(num_beams=3))
    model.build(Vocabulary([f"w{i}" for i in range(30)], max_length=6))
    optimizer = torch.optim.SGD(model.decoder.parameter_groups(0.5), lr=0.5)
    for _ in range(3):
        tokens = torch.randint(3, 30, (4, 6))
        caption_cross_entropy(model.decoder(torch.randn(4, 8), tokens[:, :-1]).logits, tokens[:, 1:], 0).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert sum(".lora_" in k for k in state) == 2 * 3 * 2  # A and B, three targets, two layers
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    captions = [row["caption"] for row in Captioner(model).describe(list(images))]
    folder = export_onnx(model, tmp_path / "lora")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # merged for export only
    assert [row["caption"] for row in OnnxCaptioner(folder).describe(list(images.numpy()))] == captions
    graphs = [onnx.load(path, load_external_data=False) for path in folder.glob("*.onnx")]
    adapted = [
        node.name
        for graph in graphs
        for node in graph.graph.node
        if any(f"/{target}/" in node.name for target in ("q_proj", "v_proj", "o_proj"))
    ]
    assert adapted and all("/base_layer/" in name for name in adapted)  # one matrix per adapted layer: merged
    # Rebuilt from its recorded options, as a checkpoint is, the same adapters load and caption alike.
    rebuilt = CaptionModel(PrefixLMDecoder, encoder=TinyConvEncoder(width=8), decoding=DecodingConfig(num_beams=3))
    rebuilt.decoder_factory = functools.partial(PrefixLMDecoder, **model.decoder.spec()["init_args"])
    rebuilt.build(model.vocabulary)
    rebuilt.load_state_dict(state)
    assert [row["caption"] for row in Captioner(rebuilt.eval()).describe(list(images))] == captions


def test_lora_starts_from_pretrained_or_frozen_weights_and_a_lora_checkpoint_asks_for_lora(saved_lm):
    import transformers

    tokenizer = Pretrained(str(saved_lm)).build([], max_length=10)
    model = PrefixLMDecoder(len(tokenizer), 8, lm=str(saved_lm), prefix_length=2, train_lm="lora")
    model.load_pretrained()
    saved = transformers.AutoModelForCausalLM.from_pretrained(saved_lm)
    adapted_layer = model.lm.transformer.h[1].attn.c_attn
    assert torch.equal(adapted_layer.base_layer.weight, saved.transformer.h[1].attn.c_attn.weight)
    frozen = decoder()
    adapted = decoder(train_lm="lora")
    adapted.load_state_dict(frozen.state_dict())  # a frozen-LM run continues with adapters
    assert torch.equal(
        adapted.lm.transformer.h[0].attn.c_attn.base_layer.weight, frozen.lm.transformer.h[0].attn.c_attn.weight
    )
    with pytest.raises(CaptionerError, match="carries LoRA adapters.*train_lm to lora"):
        decoder().load_state_dict(adapted.state_dict())


def test_lora_refusals_name_what_to_do(monkeypatch):
    with pytest.raises(CaptionerError, match=r"lora_targets \['nope'\] name no module"):
        decoder(train_lm="lora", lora_targets=["nope"])
    with pytest.raises(CaptionerError, match="lora_rank"):
        decoder(train_lm="lora", lora_rank=0)
    with pytest.raises(CaptionerError, match="train_lm must be"):
        decoder(train_lm="adapters")
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(CaptionerError, match=r"pip install 'captioner\[lora\]'"):
        decoder(train_lm="lora")
