"""The command line's flag conventions, for every command: both spellings of each long flag
(``--batch-size`` and ``--batch_size``, as Hugging Face's parser gives ``train``) and each flag's
default in ``--help``. One parser class carries them, so a new flag gets them by being added."""

from __future__ import annotations

import argparse
import copy

SPELLINGS = "Every flag also takes its other spelling: --batch-size or --batch_size."


def spellings(names: tuple[str, ...]) -> tuple[str, ...]:
    """``names`` and, after them, the other spelling of each long flag (``--batch-size`` ->
    ``--batch_size`` and back), so every command takes both, as ``train`` (Hugging Face's
    parser) does."""
    others = []
    for name in names:
        if name.startswith("--"):
            for other in (name.replace("-", "_"), name.replace("_", "-")):
                other = "--" + other[2:]
                if other not in names and other not in others:
                    others.append(other)
    return (*names, *others)


class HelpFormatter(argparse.HelpFormatter):
    """Each flag's default after its help (unless the help already says it, the default is
    None, or the flag is an on/off switch), and one spelling of each flag: the other is
    mentioned once, in the command's epilog (:data:`SPELLINGS` unless it has its own)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.default in (None, argparse.SUPPRESS) or action.nargs == 0
                or not action.option_strings or "default" in text):
            return text
        return f"{text} (default: %(default)s)"

    def _format_action_invocation(self, action: argparse.Action) -> str:
        shown = getattr(action, "spellings_shown", None)
        if shown is None:
            return super()._format_action_invocation(action)
        compact = copy.copy(action)
        compact.option_strings = action.option_strings[:shown]
        return super()._format_action_invocation(compact)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with both spellings of every long flag (:func:`spellings`) and the defaults in
    ``--help`` (:class:`HelpFormatter`); subcommands' parsers are of this class too."""

    def __init__(self, *args, formatter_class=HelpFormatter, epilog=SPELLINGS, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, epilog=epilog, **kwargs)

    def add_argument(self, *names, **kwargs):
        """``add_argument`` with the other spelling of each long flag added."""
        return _both(super().add_argument, names, kwargs)

    def add_mutually_exclusive_group(self, **kwargs):
        """A group whose flags also take both spellings."""
        return _with_both(super().add_mutually_exclusive_group(**kwargs))

    def add_argument_group(self, *args, **kwargs):
        """A titled group of flags (a section of ``--help``), each with both spellings."""
        return _with_both(super().add_argument_group(*args, **kwargs))


def _with_both(group):
    add = group.add_argument
    group.add_argument = lambda *names, **kw: _both(add, names, kw)
    return group


def _both(add, names: tuple[str, ...], kwargs: dict) -> argparse.Action:
    action = add(*spellings(names), **kwargs)
    action.spellings_shown = len(names)
    return action
