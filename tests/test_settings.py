"""Decoding settings declared once (`captioner.decoding.config.Setting`): the command-line options, the server's
request ranges, the validation and the reference table all come from the declarations."""

import argparse
import dataclasses
import types

import pytest

from captioner.core.errors import CaptionerError
from captioner.decoding import config
from captioner.decoding.config import DecodingConfig, ModelLimits


def test_every_field_is_declared_and_every_place_is_made_from_the_declarations():
    fields = [item.name for item in dataclasses.fields(DecodingConfig)]
    declared = config.settings()
    assert list(declared) == fields and all(isinstance(s, config.Setting) and s.help for s in declared.values())
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    options = {action.dest: action for action in parser._actions}
    for name, setting in declared.items():
        assert setting.help.replace("%", "%%") in options[name].help, name  # the option's help is the declaration's
    assert set(config.request_ranges(ModelLimits(50, 20, 30))) == set(fields)
    table = config.reference_table()
    assert all(f"| `{name}` |" in table for name in fields)
    assert all(f"{name}: {setting.help}" in DecodingConfig.__doc__ for name, setting in declared.items())


def test_a_changed_declaration_changes_the_validation_the_options_and_the_requests(monkeypatch):
    """The declarations are the source: tightening one bound is felt everywhere it is used."""
    field = next(item for item in dataclasses.fields(DecodingConfig) if item.name == "no_repeat_ngram_size")
    tightened = dataclasses.replace(field.metadata["setting"], low=2, request=(2, 4))
    monkeypatch.setattr(field, "metadata", types.MappingProxyType({"setting": tightened}))
    with pytest.raises(CaptionerError, match=r"no_repeat_ngram_size=1 \(at least 2\)"):
        DecodingConfig(no_repeat_ngram_size=1)
    assert config.request_ranges(ModelLimits(50, 20))["no_repeat_ngram_size"] == ("int", 2, 4)
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    assert "(at least 2)" in next(a.help for a in parser._actions if a.dest == "no_repeat_ngram_size")


def test_model_limits_bound_what_a_request_may_ask_for():
    ranges = config.request_ranges(ModelLimits(vocab_size=57, default_max_words=20, longest_caption=15))
    assert ranges["max_length"] == ("int", 1, 15) and ranges["top_k"] == ("int", 0, 57)
    assert ranges["num_beams"] == ("int", 1, config.MAX_BEAMS) and ranges["force_words"] == ("phrases", None, None)
    unbounded = config.request_ranges(ModelLimits(vocab_size=57, default_max_words=20))
    assert unbounded["max_length"] == ("int", 1, config.MAX_REQUEST_WORDS)


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ({"num_beams": 0}, "num_beams=0 (at least 1)"),
        ({"temperature": 0.0}, "temperature=0.0 (over 0)"),
        ({"top_p": 1.5}, "top_p=1.5 (in (0, 1])"),
        ({"num_beams": 4, "num_beam_groups": 3}, "a divisor of num_beams=4"),
        ({"num_beams": 2, "num_return": 3}, "num_return=3 (1 to num_beams=2)"),
    ],
)
def test_values_outside_their_declared_bounds_are_refused_naming_them(settings, says):
    with pytest.raises(CaptionerError, match="Decoding settings out of range") as refused:
        DecodingConfig(**settings)
    assert says in str(refused.value)
