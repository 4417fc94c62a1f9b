# SPDX-License-Identifier: Apache-2.0
import pytest
import torch
from torch.utils.data import Dataset

from detrkit.data.samplers import (
    ResumableRandomSampler,
    ShardedSequentialSampler,
    build_eval_loader,
    build_train_loader,
)
from detrkit.structures import ImageBatch, Target


class _TinyDataset(Dataset):
    """Image i is filled with i and has height 4 + i % 3."""

    def __init__(self, length):
        self.length = length

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        pixels = torch.full((3, 4 + index % 3, 5), float(index))
        target = Target(torch.zeros(1, dtype=torch.int64), torch.full((1, 4), 0.5), image_id=index)
        return pixels, target


def test_order_depends_only_on_seed_and_epoch():
    sampler = ResumableRandomSampler(20, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(20))
    assert list(ResumableRandomSampler(20, seed=3)) == first
    expected = torch.randperm(20, generator=torch.Generator().manual_seed(3)).tolist()
    assert first == expected
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first and sorted(second) == list(range(20))
    assert list(ResumableRandomSampler(20, seed=4)) != first


def test_resume_reproduces_the_remaining_order():
    sampler = ResumableRandomSampler(17, seed=0)
    sampler.set_epoch(2)
    full = list(sampler)
    iterator = iter(sampler)
    consumed = [next(iterator) for _ in range(6)]
    state = sampler.state_dict()
    assert state == {"epoch": 2, "position": 6}

    resumed = ResumableRandomSampler(17, seed=0)
    resumed.load_state_dict(state)
    assert len(resumed) == 11
    assert consumed + list(resumed) == full
    # after the resumed pass the next pass is the whole epoch again
    assert len(resumed) == 17 and list(resumed) == full


def test_state_dict_takes_the_callers_count():
    sampler = ResumableRandomSampler(10, seed=0)
    iterator = iter(sampler)
    [next(iterator) for _ in range(8)]  # e.g. worker prefetch ran ahead of the training loop
    assert sampler.state_dict(consumed=4) == {"epoch": 0, "position": 4}
    with pytest.raises(ValueError):
        sampler.skip(11)


def test_ranks_take_strided_slices_of_one_permutation():
    length, replicas = 10, 3
    shards = [
        list(ResumableRandomSampler(length, seed=1, num_replicas=replicas, rank=r))
        for r in range(replicas)
    ]
    assert [len(s) for s in shards] == [4, 4, 4]
    order = torch.randperm(length, generator=torch.Generator().manual_seed(1)).tolist()
    padded = order + order[:2]
    assert shards == [padded[r::replicas] for r in range(replicas)]
    assert set().union(*shards) == set(range(length))


def test_sharded_sequential_sampler_covers_each_index_once():
    shards = [list(ShardedSequentialSampler(7, num_replicas=3, rank=r)) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    with pytest.raises(ValueError):
        ShardedSequentialSampler(7, num_replicas=2, rank=2)


def test_train_loader_batches_and_is_reproducible():
    dataset = _TinyDataset(10)
    loader = build_train_loader(dataset, batch_size=3, num_workers=0, seed=7)
    batches = list(loader)
    assert len(batches) == 3  # drop_last
    images, targets = batches[0]
    assert isinstance(images, ImageBatch) and images.pixels.shape[0] == 3
    assert [t.image_id for t in targets] == images.pixels[:, 0, 0, 0].long().tolist()
    again = list(build_train_loader(dataset, batch_size=3, num_workers=0, seed=7))
    ids = [[t.image_id for t in ts] for _, ts in batches]
    assert ids == [[t.image_id for t in ts] for _, ts in again]


def test_train_loader_resumes_mid_epoch():
    dataset = _TinyDataset(12)
    loader = build_train_loader(dataset, batch_size=2, num_workers=0, seed=0)
    loader.sampler.set_epoch(1)
    full = [[t.image_id for t in ts] for _, ts in loader]
    loader.sampler.set_epoch(1)
    iterator = iter(loader)
    next(iterator), next(iterator)
    state = loader.sampler.state_dict()
    assert state == {"epoch": 1, "position": 4}
    resumed = build_train_loader(dataset, batch_size=2, num_workers=0, seed=0)
    resumed.sampler.load_state_dict(state)
    assert len(resumed) == 4
    assert [[t.image_id for t in ts] for _, ts in resumed] == full[2:]


def test_eval_loader_keeps_order_and_last_batch():
    loader = build_eval_loader(_TinyDataset(5), batch_size=2, num_workers=0)
    ids = [[t.image_id for t in ts] for _, ts in loader]
    assert ids == [[0, 1], [2, 3], [4]]


def test_aspect_ratio_grouped_loader_keeps_per_sample_augmentation_seeds():
    """Grouped batches load through the same seeded dataset: an image gets the same seed (hence
    augmentation) as in ungrouped training, and each batch has one orientation."""
    from detrkit.data.samplers import resumable_sampler

    dataset = _TinyDataset(10)
    ratios = [1.5 if i % 3 else 0.5 for i in range(10)]
    loader = build_train_loader(dataset, 2, 0, seed=7, aspect_ratios=ratios)
    sampler = resumable_sampler(loader)
    sampler.set_epoch(2)
    batches = [[t.image_id for t in ts] for _, ts in loader]
    assert len(batches) == sampler.num_samples // 2 == 5
    assert all(len({ratios[i] >= 1 for i in b}) == 1 for b in batches[:-1])
    plain = resumable_sampler(build_train_loader(dataset, 2, 0, seed=7))
    plain.set_epoch(2)
    grouped_seeds = dict(pair for batch in sampler for pair in batch)
    assert grouped_seeds == dict(iter(plain))
