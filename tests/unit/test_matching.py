# SPDX-License-Identifier: Apache-2.0
import pytest
import torch

from detrkit.matching import batch as batch_module
from detrkit.matching.batch import AssignRequest, assign_all
from detrkit.matching.costs import FocalClassCost, SoftmaxClassCost
from detrkit.matching.hungarian import HungarianAssigner
from detrkit.matching.one_to_many import TopKQualityAssigner
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


def test_repeated_targets_costed_once_solve_like_the_repeated_list():
    """H-DETR's k-times repeated targets: costs of the G boxes, tiled on the host, give the
    assignment of the explicitly repeated k x G list."""
    assigner = HungarianAssigner(FocalClassCost(), cost_class=2.0)
    targets = _targets([4, 0, 3])
    logits, boxes = _predictions(3, 30, 5)
    tiled = assigner.solve(assigner.costs(logits, boxes, targets), targets, repeat=3)
    explicit = [Target(t.labels.repeat(3), t.boxes.repeat(3, 1)) for t in targets]
    reference = assigner.solve(assigner.costs(logits, boxes, explicit), explicit)
    for (src, tgt), (ref_src, ref_tgt) in zip(tiled, reference):
        assert torch.equal(src, ref_src) and torch.equal(tgt, ref_tgt)
    assert [len(src) for src, _ in tiled] == [12, 0, 9]


def _quality_problem(num_boxes, num_queries, seed=0):
    targets = _targets([num_boxes], seed=seed)
    logits, boxes = _predictions(1, num_queries, 5, seed=seed + 1)
    return targets, logits, boxes


def _solve_quality(assigner, targets, logits, boxes):
    costs = assigner.costs(logits, boxes, targets)
    ((queries, owners),) = assigner.solve(costs, targets)
    return costs[0, : len(targets[0])], queries, owners


def test_quality_assigner_gives_each_box_its_top_k_by_positive_count():
    torch.manual_seed(0)
    assigner = TopKQualityAssigner(k=3, threshold=0.2, positive_fraction=1.0)
    targets, logits, boxes = _quality_problem(4, 60)
    quality, queries, owners = _solve_quality(assigner, targets, logits, boxes)
    best, best_box = quality.max(0)
    positive = best >= 0.2
    positive[quality.argmax(1)] = True
    for box in range(4):
        count = int((positive & (best_box == box)).sum())
        mine = queries[owners == box]
        assert len(mine) == min(count, 3)  # count from the threshold, capped at k
        expected = quality[box].topk(len(mine)).indices  # identities: the box's best queries
        assert set(mine.tolist()) == set(expected.tolist())
    assert torch.all(quality[owners, queries].diff() >= 0)  # ascending quality


def test_quality_assigner_rescues_every_box_below_the_threshold():
    """No quality reaches the threshold: the positives are exactly each box's best query, each
    counted for the box it scores best with (docs/methods.md#ms-detr-one-to-many-assigner step
    2)."""
    torch.manual_seed(0)
    assigner = TopKQualityAssigner(k=6, threshold=2.0)  # nothing reaches it
    targets, logits, boxes = _quality_problem(5, 40)
    quality, queries, owners = _solve_quality(assigner, targets, logits, boxes)
    positives = quality.argmax(1).unique()
    counts = quality[:, positives].argmax(0).bincount(minlength=5)
    expected = {
        (q, box) for box in range(5) for q in quality[box].topk(int(counts[box])).indices.tolist()
    }
    assert set(zip(queries.tolist(), owners.tolist())) == expected
    assert len(queries) == len(positives) > 0


def test_quality_assigner_caps_positives_and_handles_empty_images():
    torch.manual_seed(0)
    assigner = TopKQualityAssigner(k=6, threshold=0.0, positive_fraction=0.25)
    targets, logits, boxes = _quality_problem(3, 40)
    _, queries, _ = _solve_quality(assigner, targets, logits, boxes)
    assert 0 < len(queries) <= 10  # every query is positive: capped at 0.25 x 40
    empty = [Target(torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4))]
    ((queries, owners),) = assigner.solve(assigner.costs(logits, boxes, empty), empty)
    assert queries.numel() == 0 and owners.numel() == 0


def test_quality_assigner_scores_by_softmax_for_no_object_heads():
    targets, logits, boxes = _quality_problem(2, 10)
    logits = torch.cat((logits, torch.zeros(1, 10, 1)), -1)  # + no-object logit
    sigmoid = TopKQualityAssigner(score="sigmoid").costs(logits, boxes, targets)
    softmax = TopKQualityAssigner(score="softmax").costs(logits, boxes, targets)
    labels = targets[0].labels
    difference = 0.3 * (logits[0].softmax(-1)[:, labels].T - logits[0].sigmoid()[:, labels].T)
    torch.testing.assert_close(softmax[0] - sigmoid[0], difference)
