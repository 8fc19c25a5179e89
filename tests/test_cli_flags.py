"""flags: every command (``train`` aside: Hugging Face's parser) takes both spellings of each
flag and shows each flag's default in ``--help``."""

from __future__ import annotations

import argparse

import pytest

from galaxy_llava.cli import build_parser
from galaxy_llava.cli.flags import spellings


def test_spellings_adds_the_other_one_after_the_given():
    assert spellings(("--batch-size",)) == ("--batch-size", "--batch_size")
    assert spellings(("--n_per_class", "--n")) == ("--n_per_class", "--n", "--n-per-class")
    assert spellings(("--out", "-o")) == ("--out", "-o")
    assert spellings(("--a-b", "--a_b")) == ("--a-b", "--a_b")


def _commands():
    """(name, parser) of every subcommand but ``train`` (Hugging Face's parser)."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return [(name, parser) for name, parser in sub.choices.items() if name != "train"]


def _value(action) -> list[str]:
    """A value ``action`` accepts, as command-line words (none for a switch)."""
    if action.nargs == 0:
        return []
    if action.choices:
        return [str(list(action.choices)[-1])]
    return [{int: "3", float: "0.25"}.get(action.type, "x")]


def _required(parser) -> list[str]:
    words = []
    for action in parser._actions:
        if not action.option_strings and action.dest != "help":
            words.append("x")  # a positional
        elif action.required:
            words += [action.option_strings[0], *_value(action)]
    required_groups = [g for g in parser._mutually_exclusive_groups if g.required]
    for group in required_groups:
        first = group._group_actions[0]
        words += [first.option_strings[0], *_value(first)]
    return words


@pytest.mark.parametrize("name, parser", _commands(), ids=[n for n, _ in _commands()])
def test_every_flag_takes_both_spellings(name, parser):
    """--snake_case and --kebab-case on every command (train's parser has its own test)."""
    root = build_parser()
    for action in parser._actions:
        for flag in action.option_strings:
            if not flag.startswith("--") or not ({"-", "_"} & set(flag[2:])):
                continue
            for spelling in (flag.replace("_", "-"), "--" + flag[2:].replace("-", "_")):
                args = root.parse_args([name, *_required(parser), spelling, *_value(action)])
                want = (action.const if action.nargs == 0
                        else action.type(_value(action)[0]) if action.type else _value(action)[0])
                assert getattr(args, action.dest) == want, spelling


@pytest.mark.parametrize("name, parser", _commands(), ids=[n for n, _ in _commands()])
def test_help_shows_each_flags_default(name, parser):
    """Every flag's default is in --help: after its help, or said in it (None: what it means)."""
    text = " ".join(parser.format_help().split())
    one_of = {a for g in parser._mutually_exclusive_groups if g.required
              for a in g._group_actions}
    missing = []
    for action in parser._actions:
        if (not action.option_strings or action.nargs == 0 or action.required
                or action in one_of or action.default == argparse.SUPPRESS):
            continue
        if action.default is None:
            if "default" not in (action.help or ""):
                missing.append(action.option_strings[0])
        elif "".join(f"default: {action.default}".split()) not in "".join(text.split()):
            missing.append(action.option_strings[0])
    assert not missing, f"{name}: {missing}"
    assert "--batch-size or --batch_size" in text  # the other spelling, said once
