"""`galaxy-llava` command line: each subcommand parses its flags and calls one library function
with keyword arguments. This module is the entry point (``main``): the global flags, the list of
subcommands, and how an error ends a command; each group of commands has its module
(:mod:`~galaxy_llava.cli.data`, :mod:`~galaxy_llava.cli.train`, :mod:`~galaxy_llava.cli.describe`,
:mod:`~galaxy_llava.cli.evaluate`, and :mod:`~galaxy_llava.cli.toy` for the demo's commands),
and :mod:`~galaxy_llava.cli.flags` the conventions and flag groups they share.

A handler imports its command's library module when it runs only where that module imports a
heavy library (torch, transformers, pandas, ...: `tests/test_layers.py`'s HEAVY), so `--help`
imports none of them; the light ones are imported at the top, where the import graph shows them.

Errors a user can fix (:class:`galaxy_llava.errors.UserError`, a full disk, a folder that cannot
be written) print as one line, exit code 2; anything unexpected prints one line too, exit code 1,
and ``galaxy-llava --debug COMMAND ...`` shows its traceback. Outputs follow the contract of
:mod:`galaxy_llava.outputs` (``--overwrite`` replaces another output of the same kind).

Global flags (``--debug``, ``--verbose``, ``--threads N``) work before or after the command
(``train`` included: TrainingArguments' own ``debug`` is its ``--config`` YAML's ``debug:``
key); they set up the process (torch's CPU threads, transformers' progress bars and logging)
before any command imports torch or transformers. Every command takes both spellings of a flag
and shows the defaults in ``--help`` (:mod:`galaxy_llava.cli.flags`).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

from galaxy_llava import __version__
from galaxy_llava.checks import number
from galaxy_llava.cli import data, describe, evaluate, toy, train
from galaxy_llava.cli.flags import ArgumentParser
from galaxy_llava.cli.train import run_train
from galaxy_llava.config import DEFAULT_THREADS, GLOBAL_FLAGS
from galaxy_llava.errors import UserError
from galaxy_llava.training.arguments import wants_help

# The subcommands, in the order `galaxy-llava --help` lists them: data, a model, training,
# describing, measuring, and the demo. Each module adds its commands' parsers and handlers.
COMMANDS = (toy.add_synth, data.add_prepare, toy.add_tiny_model, train.add_train,
            train.add_export, describe.add_describe, evaluate.add_evaluate, evaluate.add_probe,
            describe.add_catalogue, evaluate.add_report, describe.add_serve, toy.add_demo)

DESCRIPTION = ("Teach vision-language models (LLaVA, Qwen2-VL, SmolVLM) to describe Galaxy Zoo 2 "
               "galaxies: build a caption dataset, fine-tune (full, LoRA or QLoRA), describe "
               "images, evaluate against the volunteers' votes, and catalogue whole surveys.")
EPILOG = ("Try `galaxy-llava demo` first: the whole pipeline offline on synthetic galaxies "
          "(minutes on a CPU). `galaxy-llava COMMAND --help` lists a command's flags.")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand (``train``'s flags: its own parser)."""
    p = ArgumentParser(prog="galaxy-llava", description=DESCRIPTION, epilog=EPILOG)
    p.add_argument("--version", action="version", version=f"galaxy-llava {__version__}",
                   help="print the version and exit")
    for flag, kwargs in GLOBAL_FLAGS.items():
        p.add_argument(flag, **kwargs)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    for name, s in sub.choices.items():  # main() takes them anywhere; listed in each --help
        if name != "train":
            for flag, kwargs in GLOBAL_FLAGS.items():
                s.add_argument(flag, **{**kwargs, "default": argparse.SUPPRESS})
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `galaxy-llava` console script (and of ``python -m galaxy_llava``).

    Exit codes: 0 done, 2 a problem the user can fix (one line), 1 an unexpected error (one line;
    ``--debug`` re-raises it with its traceback), 3 done but some inputs skipped as unreadable
    (``describe``, ``catalogue``), 130 interrupted."""
    argv = sys.argv[1:] if argv is None else list(argv)
    options, argv = _global_options(argv)
    debug, out = options.debug, None
    quiet = True  # transformers' logging set up (an import: skipped by train's cached --help)
    if argv[:1] == ["train"]:  # its flags are TrainingArguments': parsed by its own parser
        command, run = "train", lambda: run_train(argv[1:])
        quiet = not wants_help(argv[1:])
    else:
        args = build_parser().parse_args(argv)
        out = getattr(args, "out", None)
        command, run = args.command, lambda: args.func(args)
    try:
        use_threads(options.threads)
        if quiet:
            quiet_libraries(options.verbose)
        code = run()  # a handler may say it finished with inputs skipped
    except KeyboardInterrupt:
        print(f"galaxy-llava {command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        sys.stderr.close()
        return 0
    except Exception as e:
        if debug:
            raise
        code, message = _one_line(e, out)
        print(f"galaxy-llava {command}: {message}", file=sys.stderr)
        return code
    return code if isinstance(code, int) else 0


def _global_options(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """``--debug``, ``--verbose`` and ``--threads N`` wherever they stand, and the rest of
    ``argv``: taken out here so that they work the same for ``train``, whose parser is not ours
    (``--debug`` is galaxy-llava's there too; TrainingArguments' own ``debug`` is set in the
    ``--config`` YAML)."""
    start = 0  # the command's position: after the global flags before it
    while start < len(argv) and argv[start].startswith("-"):
        start += 2 if argv[start] == "--threads" else 1

    def parse(args: list[str]):
        parser = argparse.ArgumentParser(prog="galaxy-llava", add_help=False, allow_abbrev=False)
        for flag, kwargs in GLOBAL_FLAGS.items():
            parser.add_argument(flag, **{**kwargs, "default": None})
        return parser.parse_known_args(args)

    before, head = parse(argv[:start])
    after, tail = parse(argv[start:])
    options = argparse.Namespace(**{
        key: value if value is not None else getattr(after, key, None)
        for key, value in vars(before).items()})
    options.debug, options.verbose = bool(options.debug), bool(options.verbose)
    return options, head + tail


def use_threads(threads: int | None) -> None:
    """Set torch's CPU threads: ``threads`` (``--threads``; 0 leaves torch's own choice), else
    an ``OMP_NUM_THREADS`` the user set, else :data:`~galaxy_llava.config.DEFAULT_THREADS`
    (measured: BENCHMARKS.md). Done through ``OMP_NUM_THREADS`` before torch is imported, so the
    thread pool starts at that size (torch takes at most one per core that way) and processes
    started from here inherit it; on torch itself too when it is already imported (``main``
    called from Python)."""
    number("--threads", threads, 0, integer=True, optional=True)
    if threads is None and os.environ.get("OMP_NUM_THREADS"):
        return
    threads = DEFAULT_THREADS if threads is None else threads
    if threads == 0:
        return
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


def quiet_libraries(verbose: bool) -> None:
    """Without ``--verbose``, transformers logs errors only and draws none of its own progress
    bars (the "Loading weights" bar of every model load, "Writing model shards" of every save):
    noise around each command's output. galaxy-llava's own bars (pretraining, description, the
    Trainer's) are plain tqdm and stay, and so do the Hub's download bars (a multi-GB download
    deserves one). ``--verbose`` restores the library's defaults."""
    from transformers.utils import logging as hf_logging

    if verbose:
        hf_logging.set_verbosity_warning()
        hf_logging.enable_progress_bar()
    else:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


# OS errors a user can fix: space, permissions, a read-only disk, a file size limit.
_USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS}


def _one_line(e: Exception, out: Path | None = None) -> tuple[int, str]:
    """(exit code, one-line message) of an exception that ended a command (``out``: its
    output, named when the disk fills up)."""
    text = " ".join(str(e).split())
    if isinstance(e, UserError):
        return 2, f"error: {text}"
    if isinstance(e, OSError) and e.errno in _USER_ERRNOS:
        where = f" ({e.filename})" if e.filename else ""
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            target = f" {out}" if out is not None else where
            return 2, (f"error: no room to write{target}: {e.strerror} (a full disk or a file "
                       "size limit); free space and run again: the output was left as it was")
        return 2, f"error: {e.strerror or text}{where}"
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    return 1, (f"internal error: {type(e).__name__}{': ' + first if first else ''}; run with "
               "--debug for the traceback (galaxy-llava --debug COMMAND ...)")


if __name__ == "__main__":
    sys.exit(main())
