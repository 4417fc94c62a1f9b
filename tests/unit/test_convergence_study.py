# SPDX-License-Identifier: Apache-2.0
"""The convergence study's statistics and suites (benchmarks/convergence*.py)."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from convergence import arm_config  # noqa: E402
from convergence_report import Stat, budget_epochs, markdown_table, verdict  # noqa: E402
from convergence_suites import SUITES  # noqa: E402


def _run(aps, epochs=(1, 2, 4)):
    return dict(
        evals=[
            dict(epoch=e, AP=ap, AP50=ap + 0.2, train_seconds=10.0 * e)
            for e, ap in zip(epochs, aps)
        ],
        train_seconds=40.0,
    )


def test_a_difference_is_called_only_beyond_the_seed_spread():
    base = Stat.of([0.30, 0.32, 0.34])  # mean 0.32, std 0.02
    assert verdict(Stat.of([0.33, 0.35, 0.37]), base) == "within spread"  # 0.03 <= 0.04
    assert verdict(Stat.of([0.37, 0.38, 0.39]), base) == "better"  # gap 0.06 > 0.02 + 0.01
    assert verdict(Stat.of([0.20, 0.21, 0.22]), base) == "worse"
    assert verdict(Stat.of([0.9]), Stat.of([0.1])) == "one seed: not called"


def test_stat_is_mean_and_sample_std():
    stat = Stat.of([1.0, 2.0, 3.0])
    assert (stat.mean, stat.std, stat.n) == (2.0, 1.0, 3)
    assert str(stat) == "2.000 ± 1.000" and str(Stat.of([0.5])) == "0.500"


def test_budget_marks_are_quarter_half_and_full():
    assert budget_epochs(12) == [3, 6, 12]
    assert budget_epochs(4) == [1, 2, 4]


def test_table_reports_each_arm_against_its_base():
    setting = dict(
        epochs=4,
        arms=[
            dict(name="base", base=None),
            dict(name="new", base="base"),
            dict(name="gone", base="base"),
        ],
    )
    runs = {
        "base": [_run([0.1, 0.2, 0.30]), _run([0.1, 0.2, 0.32])],
        "new": [_run([0.2, 0.3, 0.40]), _run([0.2, 0.3, 0.41])],
    }
    lines = markdown_table(setting, runs).splitlines()
    assert len(lines) == 4  # header, rule, two arms with runs
    new = lines[3].split(" | ")
    assert new[0] == "| new" and new[1] == "2"
    assert "0.405 ± 0.007" in new[4] and new[6] == "base"
    assert new[7] == "+0.095" and new[8] == "better"


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_every_arm_of_every_suite_is_a_valid_config(suite, tmp_path):
    args = SimpleNamespace(precision="fp32")
    for setting in SUITES[suite]["settings"]:
        names = [a.name for a in setting.arms]
        assert len(set(names)) == len(names)
        for arm in setting.arms:
            assert arm.base is None or arm.base in names
            cfg = arm_config(setting, arm, tmp_path, 0, args)
            assert cfg.train.epochs == setting.epochs and cfg.train.seed == 0


def test_full_suite_is_the_setting_the_claims_need(tmp_path):
    full = SUITES["full"]
    assert len(full["seeds"]) >= 3
    crowded = next(s for s in full["settings"] if s.dataset == "crowded")
    args = SimpleNamespace(precision="fp32")
    configs = {a.name: arm_config(crowded, a, tmp_path, 0, args) for a in crowded.arms}
    base = configs["one_to_one"].model
    assert base.num_queries >= 100 and 128 <= base.hidden_dim <= 256
    hybrid = configs["hybrid"].model.schemes["hybrid"]
    assert 5 * base.num_queries <= hybrid.num_queries <= 6 * base.num_queries
    assert hybrid.loss_weight == 1.0 and hybrid.repeat_k == 6
    assert configs["hybrid_unsupervised"].model.schemes["hybrid"].loss_weight == 0.0
    assert configs["mixed"].model.schemes.get("mixed") is not None
    assert configs["cross_first"].model.schemes.get("mixed") is None
    assert configs["cross_first"].model.decoder.order == configs["mixed"].model.decoder.order
    assert configs["dino"].model.schemes.get("denoising") is not None
    assert configs["dino_no_denoising"].model.schemes.get("denoising") is None
    assert configs["co_deformable"].model.schemes.get("collaborative") is not None
    assert configs["co_deformable_base"].model.schemes.get("collaborative") is None
    assert {s.dataset for s in full["settings"]} == {"crowded", "shapes"}
