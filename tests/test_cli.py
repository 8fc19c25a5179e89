"""cli: help on every flag, a user-facing --help, --version, the global flags (--threads,
--verbose, --debug) anywhere, the thread default, the libraries' loading bars, and tiny-model's
summary line."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from importlib import metadata

import pytest
import torch

import galaxy_llava
from galaxy_llava.cli import DESCRIPTION, _global_options, build_parser, main, use_threads
from galaxy_llava.cli.toy import tiny_model_summary
from galaxy_llava.config import DEFAULT_THREADS
from galaxy_llava.errors import UserError

ENV = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
ENV.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", MPLBACKEND="Agg")


def _options(parser: argparse.ArgumentParser):
    """(parser, action) for every option and positional of ``parser`` and its subcommands."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _options(sub)
        elif not isinstance(action, argparse._HelpAction):
            yield parser, action


def test_every_flag_of_every_command_has_help():
    from galaxy_llava.training.arguments import build_parser as train_parser

    seen, missing = 0, []
    for parser in (build_parser(), train_parser()):
        for owner, action in _options(parser):
            seen += 1
            text = action.help if action.help != argparse.SUPPRESS else None
            if not (text and text.strip()):
                missing.append(f"{owner.prog} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, missing
    assert seen > 200  # the walk reached the subcommands and train's TrainingArguments flags


def test_top_level_help_is_for_users(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert " ".join(DESCRIPTION.split()) in text
    assert "calls one library function" not in text  # the module docstring is for developers
    for word in ("--version", "--threads", "--verbose", "tiny-model", "train", "demo"):
        assert word in text, word


def test_version_is_the_installed_packages(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out == f"galaxy-llava {galaxy_llava.__version__}"
    assert out == f"galaxy-llava {metadata.version('galaxy-llava')}"


@pytest.mark.parametrize("argv, threads, verbose, debug, rest", [
    (["synth", "--out", "S"], None, False, False, ["synth", "--out", "S"]),
    (["--threads", "2", "--debug", "synth", "--out", "S", "--verbose"], 2, True, True,
     ["synth", "--out", "S"]),
    (["evaluate", "--split", "train", "--threads=3"], 3, False, False,
     ["evaluate", "--split", "train"]),
    # after `train` too, --debug is galaxy-llava's (TrainingArguments' own: the YAML's debug:)
    (["train", "--output_dir", "R", "--debug", "--threads", "1"], 1, False, True,
     ["train", "--output_dir", "R"]),
    (["train", "--verbose", "--output_dir", "R"], None, True, False,
     ["train", "--output_dir", "R"]),
])
def test_global_flags_work_before_and_after_the_command(argv, threads, verbose, debug, rest):
    options, remaining = _global_options(argv)
    assert (options.threads, options.verbose, options.debug, remaining) == (
        threads, verbose, debug, rest)


def test_threads_flag_then_environment_then_default(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        use_threads(None)
        assert os.environ["OMP_NUM_THREADS"] == str(DEFAULT_THREADS)
        assert torch.get_num_threads() == DEFAULT_THREADS
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        torch.set_num_threads(1)
        use_threads(None)  # the user's OMP_NUM_THREADS is kept
        assert os.environ["OMP_NUM_THREADS"] == "3" and torch.get_num_threads() == 1
        use_threads(2)  # the flag wins over it
        assert os.environ["OMP_NUM_THREADS"] == "2" and torch.get_num_threads() == 2
        with pytest.raises(UserError, match="--threads must be >= 0"):
            use_threads(-1)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("flag, want", [([], DEFAULT_THREADS), (["--threads", "2"], 2)])
def test_threads_reach_torch_in_a_fresh_process(flag, want, tmp_path):
    """The CLI sets them before torch is imported: torch's pool starts at that size (torch
    caps it at the cores, hence 2)."""
    if (os.cpu_count() or 1) < want:
        pytest.skip(f"{want} threads need {want} cores")
    code = ("import sys; from galaxy_llava import cli; "
            "cli.use_threads(cli._global_options(sys.argv[1:])[0].threads); "
            "import torch; print(torch.get_num_threads())")
    proc = subprocess.run([sys.executable, "-c", code, *flag], env=ENV, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) == want


def test_bad_threads_is_one_line(capsys, tmp_path):
    assert main(["--threads", "-2", "synth", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "galaxy-llava synth: error: --threads must be >= 0 (got -2)"
    assert not (tmp_path / "s").exists()


def test_tiny_model_summary_says_what_was_written(tmp_path):
    args = argparse.Namespace(preset="tiny", family="llava", out=tmp_path, pretrain_steps=0)
    untrained = tiny_model_summary(args)
    assert "random weights (untrained)" in untrained and "pretrained" not in untrained
    (tmp_path / "galaxy_llava.json").write_text(json.dumps({"pretrain_loss": {
        "steps": 40, "start": 9.87654, "final": 2.34567, "final_is_mean_of_last": 10}}))
    args.pretrain_steps = 40
    line = tiny_model_summary(args)
    assert "pretrained from random weights for 40 steps" in line
    assert "loss 9.877 -> 2.346" in line and "last 10" in line
    assert "random-initialised" not in line


@pytest.mark.slow
def test_tiny_model_prints_and_saves_its_pretraining_loss(tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["tiny-model", "--out", str(out), "--pretrain-steps", "3"]) == 0
    captured = capsys.readouterr()
    saved = json.loads((out / "pretrain_loss.json").read_text())
    assert len(saved["loss"]) == 3 and saved["start"] == saved["loss"][0]
    assert f"loss {saved['start']:.3f} -> {saved['final']:.3f}" in captured.out
    assert "loss=" in captured.err  # the bar's postfix


@pytest.mark.slow
def test_library_loading_bars_only_with_verbose(tiny_model_dir, tmp_path):
    """transformers' "Loading weights" bar is noise around every command's output."""
    from PIL import Image

    image = tmp_path / "g.png"
    Image.new("RGB", (64, 64), (200, 120, 40)).save(image)
    runs = {}
    for flags in ([], ["--verbose"]):
        proc = subprocess.run(
            [sys.executable, "-m", "galaxy_llava", "describe", "--model", str(tiny_model_dir),
             str(image), "--num-beams", "1", "--max-new-tokens", "4", *flags],
            env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith(str(image))  # described either way
        runs[bool(flags)] = proc.stderr
    assert "Loading weights" not in runs[False]
    assert "Loading weights" in runs[True]


def test_debug_after_train_shows_the_traceback(monkeypatch, capsys):
    """`galaxy-llava train ... --debug`: parsed as galaxy-llava's flag (it once collided with
    TrainingArguments' own --debug: 'expected at least one argument'), so the error's traceback
    shows; without it, one line."""
    from galaxy_llava.cli import train as train_face
    from galaxy_llava.training import arguments, trainer

    seen, peeks = [], []

    def fails_after_parsing(finetune, training):
        seen.append((finetune, training))
        raise RuntimeError("boom")

    def counted(real):
        return lambda *a, **k: peeks.append(1) or real(*a, **k)

    monkeypatch.setattr(trainer, "run_training", fails_after_parsing)
    monkeypatch.setattr(arguments, "precheck", counted(arguments.precheck))
    monkeypatch.setattr(train_face, "precheck", counted(train_face.precheck))
    argv = ["train", "--data", "D", "--output_dir", "R", "--method", "lora"]
    with pytest.raises(RuntimeError, match="boom"):
        main([*argv, "--debug"])
    assert seen[-1][0].method == "lora" and not seen[-1][1].debug
    assert len(peeks) == 1  # the flags peeked at once, then parsed once (not three times)
    assert main(argv) == 1
    assert "internal error: RuntimeError: boom" in capsys.readouterr().err


@pytest.mark.parametrize("family_name", ["llava", "qwen2_vl", "idefics3"])
def test_export_names_the_family_it_wrote(family_name, tmp_path):
    """Not "a plain LLaVA checkpoint" for every family: the family and the class that loads it."""
    from transformers import AutoConfig

    from galaxy_llava.cli.train import export_summary
    from galaxy_llava.models.registry import FAMILIES

    family = next(f for f in FAMILIES.values() if f.name == family_name)
    config = AutoConfig.for_model(family.model_types[0])
    config.architectures = [f"{family_name}-architecture"]
    config.save_pretrained(tmp_path / "export")
    (tmp_path / "run" / "adapter").mkdir(parents=True)
    (tmp_path / "run" / "adapter" / "adapter_config.json").write_text("{}")
    line = export_summary(tmp_path / "run", tmp_path / "export")
    assert line == (f"wrote a plain {family.title} checkpoint ({family_name}-architecture) with "
                    f"its LoRA adapter merged in to {tmp_path / 'export'}")
    assert ("LLaVA" in line) == (family_name == "llava")


def test_describe_json_says_caption_like_the_catalogue(tiny_model_dir, tmp_path, capsys):
    from PIL import Image

    image = tmp_path / "g.png"
    Image.new("RGB", (64, 64), (200, 120, 40)).save(image)
    fast = ["--num-beams", "1", "--max-new-tokens", "4"]
    assert main(["describe", "--model", str(tiny_model_dir), str(image), "--json", *fast]) == 0
    row = json.loads(capsys.readouterr().out)
    assert list(row) == ["image", "caption"]
    assert main(["describe", "--model", str(tiny_model_dir), str(image), "--scores", *fast]) == 0
    scored = json.loads(capsys.readouterr().out)
    from galaxy_llava.scoring import score_column_names

    p_columns = score_column_names("reference")[1]
    assert [c for c in scored if c.startswith("p_")] == p_columns  # the catalogue's names
    assert {"image", "caption", "best_caption", "entropy"} <= set(scored)
    assert scored["caption"] == row["caption"]


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_export_license_flag_reaches_the_card(lora_run, tmp_path):
    from huggingface_hub import ModelCard

    out = tmp_path / "merged"
    assert main(["export", "--run", str(lora_run[0]), "--out", str(out),
                 "--license", "apache-2.0"]) == 0
    assert ModelCard.load(out / "README.md").data.license == "apache-2.0"


@pytest.mark.parametrize("command", ["describe", "evaluate", "catalogue", "serve"])
def test_decoding_flags_default_to_the_one_decoding_setting(command, monkeypatch):
    """describe, evaluate, catalogue and serve decode alike: their flags' defaults are
    config.DECODING's, and a changed DECODING changes them all (one home, not four copies)."""
    import dataclasses

    from galaxy_llava import config
    from galaxy_llava.cli import flags

    def defaults():
        sub = next(a for a in build_parser()._actions
                   if isinstance(a, argparse._SubParsersAction)).choices[command]
        return {a.dest: a.default for a in sub._actions
                if a.dest in ("num_beams", "max_new_tokens", "batch_size")}

    assert defaults() == {k: v for k, v in dataclasses.asdict(config.DECODING).items()
                          if k in defaults()}
    monkeypatch.setattr(flags, "DECODING", config.Decoding(num_beams=5, max_new_tokens=9))
    assert defaults()["num_beams"] == 5 and defaults()["max_new_tokens"] == 9


def test_library_functions_take_their_settings_by_keyword():
    """What a command calls reads the same from Python: the one or two things it acts on
    positionally, every setting by name (a positional setting would be a silent mix-up)."""
    import inspect

    from galaxy_llava.survey_catalogue import build_catalogue
    from galaxy_llava.evaluate import evaluate
    from galaxy_llava.generate import describe_paths
    from galaxy_llava.prepare import prepare
    from galaxy_llava.probe import probe
    from galaxy_llava.report import build_report
    from galaxy_llava.saving import export_run
    from galaxy_llava.serve import serve
    from galaxy_llava.toy.demo import run_demo
    from galaxy_llava.toy.synthetic import synthesize

    for function in (build_catalogue, evaluate, describe_paths, prepare, probe, build_report,
                     export_run, serve, run_demo, synthesize):
        positional = [p.name for p in inspect.signature(function).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        assert len(positional) <= 2, (function.__name__, positional)


@pytest.mark.slow
def test_the_readmes_python_block_runs(synth_dir, tiny_model_dir, tmp_path, monkeypatch,
                                      capsys):
    """README's "From Python" example, as written, on the synthetic galaxies and the tiny model
    (only its SOURCE, MODEL line changed): the library reads like the command line."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"### From Python\n.*?```python\n(.*?)```", readme, re.S).group(1)
    line = next(x for x in block.splitlines() if x.startswith("SOURCE, MODEL = "))
    block = block.replace(line, f"SOURCE, MODEL = {str(synth_dir)!r}, {str(tiny_model_dir)!r}")
    from PIL import Image

    (tmp_path / "cutouts").mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), (60 * i, 90, 200 - 50 * i)).save(tmp_path / "cutouts" /
                                                                   f"g{i}.png")
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    metrics = json.loads((tmp_path / "eval" / "lora" / "metrics.json").read_text())
    assert str(metrics["attributes"]["type"]["accuracy"]) in lines  # the accuracy printed
    assert sum(line.startswith("cutouts/g") for line in lines) == 3  # each image described
    assert (tmp_path / "runs" / "lora" / "adapter").is_dir()
    assert list((tmp_path / "catalogue").glob("part-*.parquet"))
