# SPDX-License-Identifier: Apache-2.0
"""Multi-scale deformable sampling: reference vs a naive loop, fused vs reference."""

from __future__ import annotations

import math

import pytest
import torch

import detrkit.ops.fused_sampling as fused_sampling_module
import detrkit.ops.ms_deform_attn as ms_deform_attn_module
from detrkit.ops.ms_deform_attn import (
    fused_path,
    ms_deform_attn,
    ms_deform_attn_fused,
    ms_deform_attn_reference,
)

TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
}


def make_inputs(
    level_shapes,
    batch=2,
    num_queries=5,
    num_heads=2,
    num_points=2,
    head_dim=3,
    dtype=torch.float64,
    seed=0,
    padded=False,
    special_fraction=0.3,
):
    """Random inputs; ``special_fraction`` of the coordinates sit exactly on map borders,
    pixel centres or just outside the map, the rest is uniform in [-0.3, 1.3]."""
    gen = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(level_shapes, dtype=torch.int64)
    sizes = shapes.prod(-1)
    level_start = torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))
    num_levels, num_tokens = len(level_shapes), int(sizes.sum())
    value = torch.randn(batch, num_tokens, num_heads, head_dim, generator=gen, dtype=dtype)
    if padded:
        # The last image only fills the top-left part of every level; the model zeroes the
        # values of padded tokens after value_proj (docs/methods.md#implementation-notes).
        masks = []
        for height, width in level_shapes:
            mask = torch.ones(height, width, dtype=torch.bool)
            mask[: math.ceil(0.6 * height), : math.ceil(0.7 * width)] = False
            masks.append(mask.flatten())
        value[-1, torch.cat(masks)] = 0
    shape = (batch, num_queries, num_heads, num_levels, num_points)
    locations = torch.rand(*shape, 2, generator=gen, dtype=dtype) * 1.6 - 0.3
    # Per level and axis, at pixel coordinates -1, -0.5 (border), 0, 1, size - 1, size - 0.5
    # (border), size, or at the normalised 0.5.
    extent = shapes.flip(-1).to(dtype).view(num_levels, 1, 2)  # (W, H)
    pixels = torch.tensor([-1.0, -0.5, 0.0, 1.0], dtype=dtype).view(1, -1, 1)
    pixels = torch.cat((pixels.expand(num_levels, -1, 2), extent - 1, extent - 0.5, extent), 1)
    special = torch.cat(((pixels + 0.5) / extent, 0.5 + 0 * extent), dim=1)  # [L, K, 2]
    choice = torch.randint(special.shape[1], (*shape, 2), generator=gen)
    level_index = torch.arange(num_levels).view(num_levels, 1).expand(num_levels, num_points)
    picked = special[level_index[..., None], choice, torch.arange(2)]
    use_special = torch.rand(*shape, 2, generator=gen) < special_fraction
    locations = torch.where(use_special, picked, locations)
    logits = torch.randn(batch, num_queries, num_heads, num_levels * num_points, generator=gen)
    weights = logits.to(dtype).softmax(-1).view(shape)
    return value, shapes, level_start, locations, weights


def naive_sampling(value, spatial_shapes, level_start, locations, weights):
    """Per-sample loop with the CUDA kernel's semantics (docs/methods.md#deformable-attention)."""
    batch, _, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = locations.shape
    out = value.new_zeros(batch, num_queries, num_heads, head_dim)
    for n in range(batch):
        for q in range(num_queries):
            for m in range(num_heads):
                for level in range(num_levels):
                    height, width = spatial_shapes[level].tolist()
                    start = int(level_start[level])

                    def pixel(y, x, n=n, m=m, start=start, width=width):
                        return value[n, start + y * width + x, m]

                    for p in range(num_points):
                        x, y = locations[n, q, m, level, p].tolist()
                        w_im, h_im = x * width - 0.5, y * height - 0.5
                        if not (h_im > -1 and w_im > -1 and h_im < height and w_im < width):
                            continue
                        h_low, w_low = math.floor(h_im), math.floor(w_im)
                        lh, lw = h_im - h_low, w_im - w_low
                        sample = value.new_zeros(head_dim)
                        for dy, wy in ((0, 1 - lh), (1, lh)):
                            for dx, wx in ((0, 1 - lw), (1, lw)):
                                yy, xx = h_low + dy, w_low + dx
                                if 0 <= yy < height and 0 <= xx < width:
                                    sample = sample + wy * wx * pixel(yy, xx)
                        out[n, q, m] += weights[n, q, m, level, p] * sample
    return out.flatten(2)


def outputs_and_grads(op, inputs, seed=1):
    value, shapes, level_start, locations, weights = inputs
    leaves = [t.detach().clone().requires_grad_() for t in (value, locations, weights)]
    out = op(leaves[0], shapes, level_start, leaves[1], leaves[2])
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [leaf.grad for leaf in leaves]


def test_reference_matches_naive_loop():
    inputs = make_inputs([(3, 4), (2, 1), (1, 1)], num_queries=3, special_fraction=0.5)
    torch.testing.assert_close(ms_deform_attn_reference(*inputs), naive_sampling(*inputs))


CASES = {
    "four_levels": dict(level_shapes=[(5, 7), (3, 2), (1, 1), (4, 4)]),
    "one_level": dict(level_shapes=[(6, 3)], num_points=4),
    "one_point_one_head": dict(level_shapes=[(4, 5), (2, 3)], num_points=1, num_heads=1),
    "eight_heads_four_points": dict(
        level_shapes=[(6, 9), (3, 5), (2, 3), (1, 2)], num_heads=8, num_points=4, head_dim=4
    ),
    "padded_batch": dict(level_shapes=[(8, 6), (4, 3)], batch=3, num_points=4, padded=True),
    # More samples than value rows: the value gradient takes the dense-table path.
    "many_queries": dict(level_shapes=[(4, 6), (2, 3)], num_queries=40, num_points=4),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_matches_reference(case, dtype):
    inputs = make_inputs(dtype=dtype, **CASES[case])
    reference = outputs_and_grads(ms_deform_attn_reference, inputs)
    fused = outputs_and_grads(ms_deform_attn_fused, inputs)
    for name, expected, actual in zip(("out", "value", "loc", "weights"), reference, fused):
        torch.testing.assert_close(actual, expected, **TOLERANCES[dtype], msg=name)


def test_fused_gradcheck():
    inputs = make_inputs([(3, 4), (2, 2)], batch=1, num_queries=2, special_fraction=0.0)
    value, shapes, level_start, locations, weights = inputs

    def op(v, loc, w):
        return ms_deform_attn_fused(v, shapes, level_start, loc, w)

    leaves = [t.clone().requires_grad_() for t in (value, locations, weights)]
    assert torch.autograd.gradcheck(op, leaves)


def test_fused_partial_and_no_grad():
    inputs = make_inputs([(4, 5), (2, 3)], dtype=torch.float32)
    value, shapes, level_start, locations, weights = inputs
    expected = ms_deform_attn_reference(*inputs)
    with torch.no_grad():
        torch.testing.assert_close(ms_deform_attn_fused(*inputs), expected)
    leaf = value.clone().requires_grad_()
    ms_deform_attn_fused(leaf, shapes, level_start, locations, weights).sum().backward()
    leaf_ref = value.clone().requires_grad_()
    ms_deform_attn_reference(leaf_ref, shapes, level_start, locations, weights).sum().backward()
    torch.testing.assert_close(leaf.grad, leaf_ref.grad)


@pytest.mark.parametrize("implementation", ["fused", "reference"])
def test_autocast_computes_in_float32(implementation):
    value, shapes, level_start, locations, weights = make_inputs(
        [(5, 7), (3, 2)], dtype=torch.float32
    )
    expected = ms_deform_attn(value, shapes, level_start, locations, weights, implementation)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ms_deform_attn(value, shapes, level_start, locations, weights, implementation)
        # A bfloat16 value (as value_proj gives under autocast) is sampled in float32 too.
        out_half = ms_deform_attn(
            value.bfloat16(), shapes, level_start, locations, weights, implementation
        )
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    assert out_half.dtype == torch.bfloat16
    expected_half = ms_deform_attn(
        value.bfloat16().float(), shapes, level_start, locations, weights, implementation
    )
    torch.testing.assert_close(out_half, expected_half.bfloat16())


def test_dispatcher():
    inputs = make_inputs([(3, 3)], dtype=torch.float32)
    torch.testing.assert_close(
        ms_deform_attn(*inputs, implementation="reference"), ms_deform_attn_reference(*inputs)
    )
    torch.testing.assert_close(ms_deform_attn(*inputs), ms_deform_attn_fused(*inputs))
    with pytest.raises(ValueError, match="implementation"):
        ms_deform_attn(*inputs, implementation="cuda")


def test_fused_batch_chunks(monkeypatch):
    """Large batches run in chunks of images; the result must not depend on the chunking."""
    inputs = make_inputs([(5, 7), (3, 2)], batch=3, dtype=torch.float32)
    whole = outputs_and_grads(ms_deform_attn_fused, inputs)
    monkeypatch.setattr(ms_deform_attn_module, "SAMPLES_PER_CHUNK", 1)
    chunked = outputs_and_grads(ms_deform_attn_fused, inputs)
    for expected, actual in zip(whole, chunked):
        torch.testing.assert_close(actual, expected)


def test_fused_without_queries():
    inputs = make_inputs([(3, 4), (2, 2)], num_queries=0, dtype=torch.float32)
    out, grad_value, grad_locations, grad_weights = outputs_and_grads(ms_deform_attn_fused, inputs)
    assert out.shape == (2, 0, 6) and grad_locations.shape == (2, 0, 2, 2, 2, 2)
    torch.testing.assert_close(grad_value, torch.zeros_like(grad_value))


@pytest.mark.parametrize(
    "setting, setting_value",
    [("_SAMPLED_ADDMM_DEVICES", ()), ("_INT32_MAX", 0)],
    ids=["embedding_bag_corner_grads", "int64_indices"],
)
@pytest.mark.parametrize("case", ["four_levels", "many_queries"])
def test_fused_fallbacks(monkeypatch, setting, setting_value, case):
    """The non-CPU path for the folded-weight gradients and the int64 index path."""
    monkeypatch.setattr(fused_sampling_module, setting, setting_value)
    inputs = make_inputs(dtype=torch.float64, **CASES[case])
    reference = outputs_and_grads(ms_deform_attn_reference, inputs)
    fused = outputs_and_grads(ms_deform_attn_fused, inputs)
    for expected, actual in zip(reference, fused):
        torch.testing.assert_close(actual, expected, **TOLERANCES[torch.float64])


def test_fused_non_contiguous_inputs():
    value, shapes, level_start, locations, weights = make_inputs([(3, 4), (2, 2)])
    strided = [t.transpose(0, 1).contiguous().transpose(0, 1) for t in (value, locations, weights)]
    assert not strided[0].is_contiguous()
    out = ms_deform_attn_fused(strided[0], shapes, level_start, strided[1], strided[2])
    expected = ms_deform_attn_reference(value, shapes, level_start, locations, weights)
    torch.testing.assert_close(out, expected, **TOLERANCES[torch.float64])


@pytest.mark.parametrize(("case", "table"), [("many_queries", "padded"), ("four_levels", "direct")])
def test_both_tables_match_the_reference_at_the_borders(case, table):
    """The padded-copy table (encoder-like) and the direct, masked one (decoder-like) both give
    grid_sample's zero padding, with samples on and beyond the map borders."""
    inputs = make_inputs(**{**CASES[case], "special_fraction": 0.6})
    value, shapes, _, locations, _ = inputs
    assert fused_path(value, shapes, locations, needs_value_grad=True).startswith(table)
    reference = outputs_and_grads(ms_deform_attn_reference, inputs)
    fused = outputs_and_grads(ms_deform_attn_fused, inputs)
    for name, expected, actual in zip(("out", "value", "loc", "weights"), reference, fused):
        torch.testing.assert_close(actual, expected, **TOLERANCES[torch.float64], msg=name)
