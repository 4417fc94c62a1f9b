# SPDX-License-Identifier: Apache-2.0
"""What every sampler shares: the per-sample augmentation seed and the rank check.

Kept apart so that ``samplers`` and ``grouping`` both import it and not each other.
"""

from __future__ import annotations

# Large odd multipliers spread (seed, epoch, index) over the 63-bit seed space.
EPOCH_MIX, INDEX_MIX = 1_000_003, 7_919


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of dataset ``index`` in ``epoch``: it depends on nothing else, so
    an image gets the same augmentation whichever worker, batch grouping or resume point."""
    return (seed + epoch * EPOCH_MIX + index * INDEX_MIX) % (2**63)


def check_replicas(num_replicas: int, rank: int) -> None:
    """``ValueError`` unless ``0 <= rank < num_replicas``."""
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ValueError(
            f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas}, {rank}"
        )
