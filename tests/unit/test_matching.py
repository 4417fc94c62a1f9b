# SPDX-License-Identifier: Apache-2.0
import pytest
import torch

from detrkit.matching import batch as batch_module
from detrkit.matching.batch import AssignRequest, assign_all
from detrkit.matching.costs import FocalClassCost, SoftmaxClassCost
from detrkit.matching.hungarian import HungarianAssigner
from detrkit.structures import Target


def _targets(counts, num_classes=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in counts:
        boxes = torch.cat(
            (
                torch.rand(n, 2, generator=gen) * 0.6 + 0.2,
                torch.rand(n, 2, generator=gen) * 0.3 + 0.05,
            ),
            dim=1,
        )
        out.append(Target(torch.randint(0, num_classes, (n,), generator=gen), boxes))
    return out


def _predictions(batch, queries, logits_dim, seed=1):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, queries, logits_dim, generator=gen)
    boxes = torch.cat(
        (
            torch.rand(batch, queries, 2, generator=gen) * 0.6 + 0.2,
            torch.rand(batch, queries, 2, generator=gen) * 0.3 + 0.05,
        ),
        dim=-1,
    )
    return logits, boxes


@pytest.mark.parametrize("class_cost,logits_dim", [(SoftmaxClassCost(), 6), (FocalClassCost(), 5)])
def test_batched_equals_per_image(class_cost, logits_dim):
    assigner = HungarianAssigner(class_cost)
    targets = _targets([3, 0, 5])
    logits, boxes = _predictions(3, 10, logits_dim)
    batched = assigner.solve(assigner.costs(logits, boxes, targets), targets)
    for i, target in enumerate(targets):
        single = assigner.solve(
            assigner.costs(logits[i : i + 1], boxes[i : i + 1], [target]), [target]
        )
        assert torch.equal(batched[i][0], single[0][0])
        assert torch.equal(batched[i][1], single[0][1])


def test_each_target_matched_once_and_queries_ascending():
    assigner = HungarianAssigner(SoftmaxClassCost())
    targets = _targets([4, 2])
    logits, boxes = _predictions(2, 8, 6)
    for (src, tgt), target in zip(
        assigner.solve(assigner.costs(logits, boxes, targets), targets), targets
    ):
        assert sorted(tgt.tolist()) == list(range(len(target)))
        assert src.tolist() == sorted(set(src.tolist()))


def test_empty_batch_of_targets():
    assigner = HungarianAssigner(FocalClassCost())
    targets = _targets([0, 0])
    logits, boxes = _predictions(2, 6, 5)
    matches = assigner.solve(assigner.costs(logits, boxes, targets), targets)
    assert all(len(src) == 0 and len(tgt) == 0 for src, tgt in matches)


def test_more_targets_than_queries_matches_every_query():
    assigner = HungarianAssigner(SoftmaxClassCost())
    targets = _targets([7])
    logits, boxes = _predictions(1, 4, 6)
    ((src, tgt),) = assigner.solve(assigner.costs(logits, boxes, targets), targets)
    assert sorted(src.tolist()) == [0, 1, 2, 3]
    assert len(set(tgt.tolist())) == 4


def test_matching_is_permutation_invariant_over_queries():
    assigner = HungarianAssigner(SoftmaxClassCost())
    targets = _targets([3])
    logits, boxes = _predictions(1, 9, 6)
    perm = torch.randperm(9)
    ((src, tgt),) = assigner.solve(assigner.costs(logits, boxes, targets), targets)
    ((psrc, ptgt),) = assigner.solve(
        assigner.costs(logits[:, perm], boxes[:, perm], targets), targets
    )
    original = dict(zip(tgt.tolist(), src.tolist()))
    permuted = dict(zip(ptgt.tolist(), perm[psrc].tolist()))
    assert original == permuted


def test_assign_all_moves_costs_to_host_once(monkeypatch):
    calls = []
    original = torch.Tensor.cpu

    def counting_cpu(self, *args, **kwargs):
        calls.append(self.shape)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    assigner = HungarianAssigner(SoftmaxClassCost())
    targets = _targets([2, 3])
    requests = [AssignRequest(assigner, *_predictions(2, 6, 6, seed=s), targets) for s in range(4)]
    results = assign_all(requests)
    assert len(calls) == 1
    assert len(results) == 4 and all(len(r) == 2 for r in results)
    assert batch_module.assign_all([]) == []
