"""The command line's flag conventions, for every command: both spellings of each long flag
(``--batch-size`` and ``--batch_size``, as Hugging Face's parser gives ``train``) and each flag's
default in ``--help``. One parser class carries them, so a new flag gets them by being added.
The flag groups several commands share (decoding, survey files, ``--overwrite``) live here too,
each beside the function that turns its parsed values into the library's keyword arguments."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

from galaxy_llava.config import DECODING
from galaxy_llava.errors import EXIT_SKIPPED
from galaxy_llava.fitscutouts import NOISE_STRETCH, SCALINGS, parse_options

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


# ------------------------------------------------------------ flag groups several commands share


def add_model(s: argparse.ArgumentParser, help: str = "run folder, model folder or Hub id"
              ) -> None:
    """``--model``: what every command that loads a model takes (a run, one of its
    ``checkpoint-N`` folders, a model folder or a Hub id)."""
    s.add_argument("--model", required=True, help=help)


def add_dataset(s: argparse.ArgumentParser, split_help: str) -> None:
    """``--data`` (a prepared dataset), ``--split`` and ``--out`` (an EVAL folder): the
    commands that score a split (evaluate, probe)."""
    s.add_argument("--data", type=Path, required=True,
                   help="prepared dataset folder (galaxy-llava prepare)")
    s.add_argument("--split", default="test", help=split_help)
    s.add_argument("--out", type=Path, required=True, help="EVAL folder to write")


def add_overwrite(s: argparse.ArgumentParser) -> None:
    """``--overwrite``: the output contract's one way to replace an output
    (:mod:`galaxy_llava.outputs`)."""
    s.add_argument("--overwrite", action="store_true",
                   help="replace an output of the same kind made from other inputs (never a "
                        "folder by a file, nor one kind of output by another)")


def add_outside(s: argparse.ArgumentParser) -> None:
    """``--allow-outside-paths``: images are read only inside the folders the user gave,
    unless this says otherwise."""
    s.add_argument("--allow-outside-paths", action="store_true",
                   help="read images outside the dataset's or catalogue's own folder (a CSV "
                        "whose file_loc paths are absolute needs it)")


def add_decoding(s: argparse.ArgumentParser, batch: bool = True) -> None:
    """The decoding flags of a command that describes images, with
    :data:`~galaxy_llava.config.DECODING`'s defaults (``batch``: also ``--batch-size``)."""
    if batch:
        s.add_argument("--batch-size", type=int, default=DECODING.batch_size,
                       help="images per batch")
    s.add_argument("--num-beams", type=int, default=DECODING.num_beams,
                   help="beam width (1: greedy)")
    s.add_argument("--max-new-tokens", type=int, default=DECODING.max_new_tokens,
                   help="longest answer, in tokens")


def decoding(args: argparse.Namespace) -> dict:
    """The decoding flags :func:`add_decoding` added, as the library's keyword arguments."""
    names = ("batch_size", "num_beams", "max_new_tokens")
    return {name: getattr(args, name) for name in names if hasattr(args, name)}


def add_survey(s: argparse.ArgumentParser) -> None:
    """The flags of a command that reads a survey's files (describe, catalogue): ``--strict``
    and the FITS options (:class:`~galaxy_llava.fitscutouts.FitsOptions`)."""
    s.add_argument("--strict", action="store_true",
                   help="stop at the first input that cannot be read (default: skip it, say "
                        f"so, and exit with code {EXIT_SKIPPED} at the end)")
    g = s.add_argument_group("survey images (FITS)")
    g.add_argument("--fits-hdu", default=None, metavar="N|NAME",
                   help="the HDU to read, by index or EXTNAME (default: the first image HDU "
                        "with pixels; tables are never read)")
    g.add_argument("--bands", default=None, metavar="B,B,B",
                   help="1 or 3 bands, bluest first, by plane index (0 = first) or by the "
                        "header's BAND<k>/FILTER<k> names, e.g. g,r,z; names also group "
                        "single-band files of one object (J1234-g.fits, J1234-r.fits, ...); "
                        "default: a file's 1 or 3 planes as they are")
    g.add_argument("--scaling", default="lupton", choices=SCALINGS,
                   help="how bands become colours: lupton (Lupton et al. 2004, the SDSS "
                        "images GZ2 was classified on) or percentile (asinh between the 0.5th "
                        "and 99.5th percentiles)")
    g.add_argument("--lupton-stretch", type=float, default=None,
                   help=f"Lupton's linear stretch, in the file's flux units (default: "
                        f"{NOISE_STRETCH:g} x the sky's sigma-clipped noise)")
    g.add_argument("--lupton-q", type=float, default=8.0, help="Lupton's asinh softening Q")
    g.add_argument("--keep-sky", action="store_true",
                   help="keep the sky level (by default the sigma-clipped sky is subtracted)")


def survey(args: argparse.Namespace) -> dict:
    """The flags :func:`add_survey` added, as the library's ``strict`` and ``fits`` keyword
    arguments."""
    fits = parse_options(args.fits_hdu, args.bands, args.scaling, args.lupton_stretch,
                         args.lupton_q, args.keep_sky)
    return {"strict": args.strict, "fits": fits}
