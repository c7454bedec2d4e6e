"""``kvpipe.runtime.adapters``: what kvpipe reads of a model and of a transformers release, on stand-in modules."""
from __future__ import annotations

import pytest
import torch

from kvpipe.errors import UnsupportedModelError
from kvpipe.runtime import adapters

from conftest import tiny_model


class OldDecoder(torch.nn.Module):
    def forward(self, input_ids=None, past_key_values=None, attention_mask=None):
        return input_ids


class NewDecoder(torch.nn.Module):
    def forward(self, input_ids=None, cache=None, attention_mask=None):
        return input_ids


def test_the_cache_argument_is_the_one_the_decoder_declares():
    assert adapters.cache_keyword(OldDecoder()) == "past_key_values"
    assert adapters.cache_keyword(NewDecoder()) == "cache"
    assert adapters.cache_keyword(tiny_model().model) in ("cache", "past_key_values")


@pytest.mark.parametrize("argument", [5, torch.arange(10, 15)])
def test_get_mask_sizes_argument_is_read_as_a_length(argument):
    assert adapters.query_length(argument) == 5          # a length (>= 5.3) or cache_position (< 5.3)


def test_what_observers_read_of_a_layer():
    model = tiny_model()
    attention = model.model.layers[0].self_attn
    assert adapters.output_projection(attention) is attention.o_proj.weight
    assert adapters.output_projection(torch.nn.Linear(2, 2)) is None
    assert adapters.find_decoder(model) is model.model


def test_a_model_without_decoder_layers_is_refused_with_what_kvpipe_supports():
    with pytest.raises(UnsupportedModelError, match="decoder-only model"):
        adapters.find_decoder(torch.nn.Linear(2, 2))
