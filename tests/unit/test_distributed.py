# SPDX-License-Identifier: Apache-2.0
"""Process-group settings read from torchrun and Slurm environments."""

from __future__ import annotations

import pytest

from detrkit.engine.distributed import first_slurm_host, init_distributed


@pytest.mark.parametrize(
    ("nodelist", "host"),
    [
        ("gpu001", "gpu001"),
        ("gpu[003-005,9]", "gpu003"),
        ("gpu[12,14],cpu1", "gpu12"),
        ("node-a,node-b", "node-a"),
        ("a100-[0007-0008]", "a100-0007"),
    ],
)
def test_first_slurm_host(nodelist, host):
    assert first_slurm_host(nodelist) == host


def test_slurm_task_variables_give_rank_and_local_rank(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    context = init_distributed("cpu")
    assert (context.rank, context.world_size, context.is_main) == (0, 1, True)
    assert not context.distributed
