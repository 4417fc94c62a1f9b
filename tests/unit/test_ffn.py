# SPDX-License-Identifier: Apache-2.0
"""FFN: the fused ReLU + dropout used in training equals the unfused pair and keeps less."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from detrkit.layers.ffn import FFN


def _unfused(ffn: FFN, x: torch.Tensor) -> torch.Tensor:
    return ffn.linear2(ffn.dropout(F.relu(ffn.linear1(x))))


def _saved_bytes(run) -> int:
    """Bytes of the distinct tensors autograd keeps for backward while ``run()`` builds a graph."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(storages.values())


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_fused_relu_dropout_matches_the_unfused_pair(p: float) -> None:
    torch.manual_seed(0)
    ffn = FFN(16, 64, dropout=p).train()
    x = torch.randn(3, 7, 16, requires_grad=True)
    probe = torch.randn(3, 7, 16)
    results = []
    for forward in (ffn, lambda inputs: _unfused(ffn, inputs)):
        torch.manual_seed(1)  # the same dropout mask for both
        out = forward(x)
        grads = torch.autograd.grad((out * probe).sum(), [x, *ffn.parameters()])
        results.append((out, grads))
    (fused_out, fused_grads), (plain_out, plain_grads) = results
    torch.testing.assert_close(fused_out, plain_out, rtol=0, atol=0)
    for fused, plain in zip(fused_grads, plain_grads):
        torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-7)
    assert (fused_out != ffn.linear2.bias).any()  # some units were kept


def test_fused_relu_dropout_keeps_only_its_output() -> None:
    torch.manual_seed(0)
    ffn = FFN(16, 256, dropout=0.1).train()
    x = torch.randn(64, 16, requires_grad=True)
    fused = _saved_bytes(lambda: ffn(x))
    unfused = _saved_bytes(lambda: _unfused(ffn, x))
    hidden_bytes = 64 * 256 * 4
    # Unfused: relu's output, dropout's mask (bool) and dropout's output; fused: the output only.
    assert unfused - fused >= hidden_bytes + 64 * 256


def test_eval_and_no_dropout_take_the_plain_path() -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 16)
    for ffn in (FFN(16, 32, dropout=0.1).eval(), FFN(16, 32, dropout=0.0).train()):
        torch.testing.assert_close(ffn(x), ffn.linear2(F.relu(ffn.linear1(x))), rtol=0, atol=0)
