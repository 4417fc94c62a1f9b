# SPDX-License-Identifier: Apache-2.0
"""AddNorm: the residual + LayerNorm of every transformer sub-block."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from detrkit.layers.attention import CrossAttention, SelfAttention
from detrkit.layers.ffn import FFN
from detrkit.layers.residual import AddNorm
from detrkit.models.decoder import DecoderLayer
from detrkit.models.encoder import EncoderLayer


def _reference_norm(block: AddNorm) -> nn.LayerNorm:
    """A plain LayerNorm with the block's affine parameters."""
    norm = nn.LayerNorm(block.normalized_shape)
    norm.load_state_dict(block.state_dict())
    return norm


def _block(pre_norm: bool, dropout: float = 0.0) -> AddNorm:
    block = AddNorm(8, dropout, pre_norm=pre_norm)
    with torch.no_grad():  # non-trivial affine parameters, so the norm's place shows
        block.weight.uniform_(0.5, 1.5)
        block.bias.uniform_(-0.5, 0.5)
    return block


def test_post_norm_normalises_the_sum():
    block, sublayer = _block(pre_norm=False), nn.Linear(8, 8)
    x = torch.randn(2, 5, 8)
    expected = _reference_norm(block)(x + sublayer(x))
    torch.testing.assert_close(block(x, sublayer), expected)
    torch.testing.assert_close(block.add(x, sublayer(x)), expected)


def test_pre_norm_normalises_the_sublayer_input_only():
    block, sublayer = _block(pre_norm=True), nn.Linear(8, 8)
    x = torch.randn(2, 5, 8)
    expected = x + sublayer(_reference_norm(block)(x))
    torch.testing.assert_close(block(x, sublayer), expected)
    with pytest.raises(ValueError, match="post-norm only"):
        block.add(x, sublayer(x))


@pytest.mark.parametrize("pre_norm", [False, True])
def test_dropout_applies_in_training_only(pre_norm):
    block = _block(pre_norm, dropout=0.9)
    x, sublayer = torch.randn(4, 16, 8), nn.Linear(8, 8)
    norm = _reference_norm(block)
    without = x + sublayer(norm(x)) if pre_norm else norm(x + sublayer(x))
    block.eval()
    torch.testing.assert_close(block(x, sublayer), without)
    block.train()
    assert not torch.allclose(block(x, sublayer), without)


def test_state_dict_keys_are_those_of_a_layer_norm():
    # Converters and recorded checkpoints address these as "<layer>.<op>_norm.weight|bias".
    assert set(AddNorm(8, 0.1).state_dict()) == {"weight", "bias"}
    encoder = EncoderLayer(8, 2, 16)
    assert {k for k in encoder.state_dict() if "_norm." in k} == {
        "self_attn_norm.weight",
        "self_attn_norm.bias",
        "ffn_norm.weight",
        "ffn_norm.bias",
    }


@pytest.mark.parametrize("pre_norm", [False, True])
def test_encoder_layer_matches_the_written_out_residuals(pre_norm):
    layer = EncoderLayer(8, 2, 16, dropout=0.0, pre_norm=pre_norm).eval()
    tokens, pos = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    attn_norm, ffn_norm = _reference_norm(layer.self_attn_norm), _reference_norm(layer.ffn_norm)

    def attend(x):
        return layer.self_attn(x, pos, key_padding_mask=mask)

    if pre_norm:
        x = tokens + attend(attn_norm(tokens))
        expected = x + layer.ffn(ffn_norm(x))
    else:
        x = attn_norm(tokens + attend(tokens))
        expected = ffn_norm(x + layer.ffn(x))
    torch.testing.assert_close(layer(tokens, pos, mask), expected)


def test_decoder_layer_pre_norm_flag_reaches_every_residual():
    layer = DecoderLayer(
        self_attn=SelfAttention(8, 2),
        cross_attn=CrossAttention(8, 2),
        ffn=FFN(8, 16),
        dim=8,
        pre_norm=True,
    )
    norms = (layer.self_attn_norm, layer.cross_attn_norm, layer.ffn_norm)
    assert all(isinstance(n, AddNorm) and n.pre_norm for n in norms)
