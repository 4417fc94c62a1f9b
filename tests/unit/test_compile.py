# SPDX-License-Identifier: Apache-2.0
"""``train.compile``: the regionally compiled model computes what the eager one does.

Inductor compiles C++ on the CPU (about 25 s here); without a C++ compiler the test is skipped.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from detrkit.engine.compile import compile_regions
from tests.unit.test_step import _batch, _setup

pytestmark = [
    pytest.mark.compile,
    pytest.mark.skipif(shutil.which("c++") is None, reason="torch.compile needs a C++ compiler"),
]


def test_compiled_regions_match_eager_forward_and_backward():
    eager, criterion, _ = _setup()
    compiled, _, _ = _setup()
    names = compile_regions(compiled)
    assert names[0] == "backbone" and any(n.startswith("decoder.layers.") for n in names)
    images, targets = _batch()
    losses = [criterion(m(images, targets), targets).total for m in (eager, compiled)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)
    for loss in losses:
        loss.backward()
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        if a.grad is not None:
            # Fused kernels reassociate sums: compare against each gradient's own scale (some,
            # e.g. biases before a normalisation, are zero up to rounding).
            scale = a.grad.abs().max().item()
            error = (b.grad - a.grad).abs().max().item()
            assert error <= 1e-3 * scale + 1e-7, (name, error, scale)
