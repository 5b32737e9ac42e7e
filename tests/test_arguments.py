"""Argument files, the flags a command line gives, and every script's parser."""
from __future__ import annotations

import ast

import pytest

from tests.cli_runner import REPO
from tools.artifacts.provenance import settings_of
from tools.cli.arguments import StageArgumentParser, given_flags, positive_int


def test_an_args_file_holds_an_ablation_and_only_given_flags_are_marked(tmp_path):
    parser = StageArgumentParser()
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch_size", type=positive_int, default=8)
    parser.add_argument("--tag", default="x")
    ablation = tmp_path / "lower_lr.args"
    ablation.write_text("--lr\n0.01\n--tag\nlow\n")
    args = parser.parse_args([f"@{ablation}", "--batch_size", "4"])
    assert (args.lr, args.tag, args.batch_size) == (0.01, "low", 4)
    assert given_flags(args) == {"lr", "tag", "batch_size"}
    assert given_flags(parser.parse_args([])) == set()
    assert "_given_flags" not in settings_of(args)  # not a setting: provenance ignores it
    with pytest.raises(SystemExit):
        parser.parse_args([f"@{tmp_path / 'absent.args'}"])


def test_every_script_parses_with_the_stage_parser():
    scripts = sorted(REPO.glob("*.py")) + sorted((REPO / "tools").glob("*.py"))
    plain = []
    for path in scripts:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "ArgumentParser":
                plain.append(path.name)
    assert not plain, f"scripts with a plain argparse.ArgumentParser (no @file.args): {plain}"
