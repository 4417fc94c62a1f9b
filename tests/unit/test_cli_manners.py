# SPDX-License-Identifier: Apache-2.0
"""CLI manners: --version without torch, `detrkit presets`, defaults and presets in --help."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from detrkit import __version__
from detrkit.cli.__main__ import build_parser, main
from detrkit.cli.presets import format_presets
from detrkit.config.load import PresetInfo, describe_preset, list_presets
from detrkit.errors import UserError


def test_version_answers_without_importing_torch():
    code = (
        "import sys; from detrkit.cli.__main__ import main; rc = main(['--version']); "
        "print(rc, 'torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["detrkit", __version__, "0", "False"]


def test_version_after_verbose_flag_is_answered_too(capsys):
    assert main(["-v", "--version"]) == 0
    assert capsys.readouterr().out.strip() == f"detrkit {__version__}"


@pytest.mark.parametrize(
    ("name", "ap"),
    [
        ("detr_r50", 42.0),
        ("deformable_detr_r50_two_stage", 46.9),
        ("hdetr_swin_l_tricks_900q_dp05_wd005_36ep", 57.8),  # not the 57.4 it compares with
        ("detr_r50_150ep", 39.5),  # not its AP50
        ("hdetr_r50_tricks_900q_12ep", None),  # its comment quotes the Swin-L number only
        ("deformable_detr_tiny", None),
        ("msdetr_impl_a_r50", None),
    ],
)
def test_published_ap_is_read_from_the_preset_comment(name, ap):
    assert describe_preset(name).published_ap == ap


def test_every_preset_has_a_one_line_description():
    for name in list_presets():
        info = describe_preset(name)
        assert info.description and "\n" not in info.description, name
        assert " AP" not in info.description and "docs/" not in info.description, name


def test_unknown_preset_is_a_user_error_with_nearest_names():
    with pytest.raises(UserError, match="closest names \\(nearest first\\): detr_r50"):
        describe_preset("detr_r5")


def test_presets_command_lists_every_preset(capsys):
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["preset", "AP", "description"]
    rows = {line.split()[0]: line.split()[1] for line in lines[1:]}
    assert sorted(rows) == list_presets()
    assert rows["detr_r50"] == "42.0" and rows["detr_tiny"] == "-"


def test_presets_table_cuts_descriptions_to_the_width():
    info = PresetInfo("detr_x", "a rather long description " * 5, 40.0)
    (row,) = format_presets([info], width=60).splitlines()[1:]
    assert len(row) == 60 and row.endswith("...") and row.startswith("detr_x  ")
    assert format_presets([info]).endswith(info.description)


def _sub_parsers(parser: argparse.ArgumentParser):
    """Every (sub-)command parser below ``parser``, depth first."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _sub_parsers(sub)


def test_every_option_with_a_default_shows_it_in_help():
    for parser in _sub_parsers(build_parser()):
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            default = action.default
            if not action.option_strings or action.nargs == 0 or default is None:
                continue  # positionals, flags (their default is off) and unset options
            if default is argparse.SUPPRESS or (isinstance(default, list) and not default):
                continue
            assert f"(default: {default})" in text, (parser.prog, action.option_strings)


@pytest.mark.parametrize("command", ["train", "demo"])
def test_help_of_commands_with_config_lists_the_presets(command, capsys):
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert "detrkit presets" in text
    assert all(name in text for name in list_presets())


def test_option_defaults_of_train_and_eval_are_stated(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    train = " ".join(capsys.readouterr().out.split())
    assert "(default: detr_r50; with --resume, the config stored in the run)" in train
    assert "default the resumed run's folder" in train
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    evaluate = " ".join(capsys.readouterr().out.split())
    assert "autocast precision (default: fp32)" in evaluate
    assert "(default: the checkpoint's run folder)" in evaluate
