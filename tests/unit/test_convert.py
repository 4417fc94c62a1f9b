# SPDX-License-Identifier: Apache-2.0
import argparse
import json
import os
import pickle

import pytest
import torch

from detrkit.cli.__main__ import main
from detrkit.convert.rules import RenameRule, SplitRule, convert_state_dict
from detrkit.convert.sources import SOURCES
from detrkit.inference import load_model
from tests.golden.golden_case import SHIPPED_DIR, GoldenCase


def test_rules_report_unmatched_dropped_and_collisions():
    source = {
        "a.w": torch.zeros(1),
        "b.w": torch.zeros(1),
        "c.w": torch.zeros(1),
        "qkv": torch.arange(6.0),
    }
    rules = [RenameRule(r"(a|b)\.w", "x.w"), RenameRule(r"c\.w", None)]
    splits = [SplitRule(r"qkv", ("q", "k", "v"))]
    result = convert_state_dict(source, rules, splits)
    assert result.collisions == ["x.w"]
    assert result.dropped == ["c.w"]
    assert not result.unmatched and not result.clean
    torch.testing.assert_close(result.state_dict["k"], torch.tensor([2.0, 3.0]))
    assert convert_state_dict({"zzz": torch.zeros(1)}, rules).unmatched == ["zzz"]


def _case(name: str = "detr_r18") -> GoldenCase:
    path = SHIPPED_DIR / f"{name}.json"
    if not path.is_file():
        pytest.skip(f"golden case {path} not available")
    return GoldenCase.load(path)


@pytest.mark.parametrize(
    "name",
    ["detr_r18", "deformable_detr_r18_ms_refine_twostage", "hdetr_r18_ms_refine_twostage_mqs_lft"],
)
def test_cli_convert_of_official_checkpoint_reproduces_golden_outputs(tmp_path, name):
    case = _case(name)
    official = tmp_path / "official.pth"
    torch.save(
        {"model": case.official_state, "args": argparse.Namespace(**case.spec["args"]), "epoch": 3},
        official,
    )
    out = tmp_path / "converted.safetensors"
    assert main(["convert", "--from", case.source.name, str(official), "--out", str(out)]) == 0
    loaded = load_model(out)
    assert loaded.label_map.num_classes == 91
    assert loaded.label_map.names[18] == "dog" and loaded.label_map.to_category(18) == 18
    with torch.no_grad():
        output = loaded.model(case.batch())
    torch.testing.assert_close(
        output.for_inference().logits[-1],
        case.tensors["eval.f32.out.pred_logits"],
        atol=1e-4,
        rtol=1e-4,
    )


def test_args_json_for_files_without_args(tmp_path):
    case = _case()
    official = tmp_path / "bare.pth"
    torch.save({"model": case.official_state}, official)
    out = tmp_path / "bare.safetensors"
    assert main(["convert", "--from", "detr", str(official), "--out", str(out)]) == 2
    args_json = tmp_path / "args.json"
    args_json.write_text(json.dumps(case.spec["args"]))
    assert (
        main(
            [
                "convert",
                "--from",
                "detr",
                str(official),
                "--out",
                str(out),
                "--args-json",
                str(args_json),
            ]
        )
        == 0
    )


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/detrkit_pwned",))


def test_malicious_pickle_is_refused(tmp_path, capsys):
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"model": {}, "args": _Exploit()}))
    assert main(["convert", "--from", "detr", str(evil), "--out", str(tmp_path / "o")]) == 2
    assert "refused to load" in capsys.readouterr().err
    assert not os.path.exists("/tmp/detrkit_pwned")


def test_every_source_has_rules():
    for source in SOURCES.values():
        assert source.repos and source.splits is not None


def test_msdetr_impl_a_checkpoint_converts_and_keeps_the_deformable_outputs(tmp_path):
    """Implementation (a) is Deformable DETR plus separate one-to-many class heads
    (docs/methods.md#ms-detr-implementation-a,
    C4.6): a Deformable DETR golden state dict with those heads added converts cleanly, its
    eval outputs are the recorded Deformable DETR ones, and the one-to-many group predicts from
    the same hidden states with the extra class heads and the shared boxes."""
    case = _case("deformable_detr_r18_ms_refine_twostage")
    layers = case.spec["args"]["dec_layers"]
    state = dict(case.official_state)
    generator = torch.Generator().manual_seed(0)
    for i in range(layers):
        for part in ("weight", "bias"):
            own = state[f"class_embed.{i}.{part}"]
            state[f"class_embed_o2m.{i}.{part}"] = torch.randn(own.shape, generator=generator)
        for key in [k for k in case.official_state if k.startswith(f"bbox_embed.{i}.")]:
            state[key.replace("bbox_embed", "bbox_embed_o2m", 1)] = state[key]
    args = dict(case.spec["args"], use_ms_detr=True)
    official = tmp_path / "impl_a.pth"
    torch.save({"model": state, "args": argparse.Namespace(**args)}, official)
    out = tmp_path / "impl_a.safetensors"
    assert main(["convert", "--from", "msdetr_impl_a", str(official), "--out", str(out)]) == 0
    model = load_model(out).model
    mixed = model.schemes["mixed"]
    last = layers - 1
    torch.testing.assert_close(mixed.class_heads[last].bias, state[f"class_embed_o2m.{last}.bias"])
    with torch.no_grad():
        evaluated = model.eval()(case.batch())
    torch.testing.assert_close(
        evaluated.for_inference().boxes[-1],
        case.tensors["eval.f32.out.pred_boxes"],
        atol=1e-4,
        rtol=1e-4,
    )
    with torch.no_grad():
        trained = model.train()(case.batch(), case.targets())
    main_group, o2m = trained.group("main"), trained.group("ms_o2m")
    torch.testing.assert_close(o2m.boxes, main_group.boxes, atol=0, rtol=0)
    assert not torch.allclose(o2m.logits, main_group.logits)
