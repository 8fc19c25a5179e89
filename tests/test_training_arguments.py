"""galaxy-llava train's arguments: TrainingArguments names as flags and YAML keys, method
defaults, precedence, and what config.yaml records."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from galaxy_llava.config import METHOD_DEFAULTS, shipped_configs
from galaxy_llava.errors import UserError
from galaxy_llava.training.arguments import (build_parser, parse_cli, parse_settings,
                                             settings_to_save)

BASE = ["--data", "D", "--output_dir", "OUT"]


def test_help_lists_the_training_arguments_names(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for name in ("--learning_rate", "--num_train_epochs", "--per_device_train_batch_size",
                 "--gradient_accumulation_steps", "--logging_steps", "--save_steps", "--bf16",
                 "--output_dir", "--report_to", "--push_to_hub", "--fsdp", "--deepspeed",
                 "--gradient_checkpointing", "--torch_compile", "--eval_strategy",
                 "--resume_from_checkpoint", "--method", "--lora_r", "--feature_cache",
                 "--config", "--threads", "--verbose", "demo-lora"):
        assert name in text, name


@pytest.mark.parametrize("method", ["full", "lora"])
def test_method_defaults_follow_the_reference_recipe(method):
    ft, args = parse_cli([*BASE, "--method", method])
    want = METHOD_DEFAULTS[method]
    assert args.learning_rate == want["learning_rate"]
    assert args.per_device_train_batch_size == want["per_device_train_batch_size"]
    assert (args.num_train_epochs, ft.lora_r, ft.lora_alpha, ft.lora_dropout) == (3, 8, 16, 0.05)
    assert args.optim == "adamw_torch_fused" and args.remove_unused_columns is False
    assert {1: "full", 8: "lora"}[args.per_device_train_batch_size] == method


def test_precedence_defaults_then_yaml_then_flags(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("method: lora\nlearning_rate: 1e-4\nlogging_steps: 3\nlora_r: 4\n")
    ft, args = parse_cli([*BASE, "--config", str(cfg), "--logging_steps", "7"])
    assert (ft.method, args.learning_rate, args.logging_steps, ft.lora_r) == ("lora", 1e-4, 7, 4)
    assert args.per_device_train_batch_size == 8  # the method's default, below the YAML
    ft2, args2 = parse_settings({"data": "D", "output_dir": "OUT", "logging_steps": 7},
                                config=str(cfg))
    assert (ft2, args2.learning_rate, args2.logging_steps) == (ft, 1e-4, 7)


def test_model_alias_and_dashed_flags():
    ft, args = parse_cli(["--model", "m/x", "--data", "D", "--output-dir", "OUT", "--method",
                          "full", "--learning-rate", "0.5"])
    assert ft.model_name_or_path == "m/x" and args.learning_rate == 0.5


@pytest.mark.parametrize("text, needle", [
    ("lr: 0.1\n", "unknown setting 'lr'"), ("- 1\n", "mapping"), ("a: [\n", "not valid YAML")])
def test_bad_yaml_is_a_one_line_user_error(tmp_path, text, needle):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(UserError, match=needle):
        parse_cli([*BASE, "--method", "full", "--config", str(cfg)])


@pytest.mark.parametrize("settings, needle", [
    ({"method": "sgd"}, "unknown method 'sgd'"), ({}, "no training method"),
    ({"method": "lora", "lora_dropout": 1.5}, "lora_dropout"),
    ({"method": "lora", "bogus": 1}, "unknown setting 'bogus'"),
    ({"method": "lora", "output_dir": None}, "no output folder"),
    ({"method": "lora", "feature_cache": "gpu"}, "unknown feature_cache"),
    # TrainingArguments itself accepts these (and trains a step at lr=inf)
    ({"method": "lora", "learning_rate": float("inf")}, "--learning_rate must be a finite"),
    ({"method": "lora", "learning_rate": 0.0}, "--learning_rate must be > 0"),
    ({"method": "lora", "num_train_epochs": float("inf")}, "--num_train_epochs must be a finite"),
    ({"method": "lora", "num_train_epochs": float("nan")}, "--num_train_epochs must be a finite"),
    ({"method": "lora", "seed": -1}, "--seed must be in"),
    ({"method": "lora", "weight_decay": -0.1}, "--weight_decay must be >= 0"),
    ({"method": "lora", "lora_dropout": float("nan")}, "lora_dropout")])
def test_bad_settings_are_user_errors(settings, needle):
    with pytest.raises(UserError, match=needle):
        parse_settings({"data": "D", "output_dir": "OUT", **settings})


def test_shipped_configs_parse_by_name_and_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # from any folder, not only the clone's root
    for name, path in shipped_configs().items():
        ft, args = parse_cli([*BASE, "--config", name])
        ft_path, args_path = parse_cli([*BASE, "--config", str(path)])
        assert ft.method in ("full", "lora"), name
        assert ft == ft_path and args.to_dict() == args_path.to_dict(), name
    ft, args = parse_cli([*BASE, "--config", "demo-lora"])
    assert (ft.lora_r, args.learning_rate, args.num_train_epochs) == (16, 3e-3, 12)


def test_unknown_config_name_lists_the_shipped():
    with pytest.raises(UserError, match=r"'demo-qlora' not found: .* shipped config: demo-full, "
                                        r"demo-full-votes, demo-lora, full, lora$"):
        parse_cli([*BASE, "--config", "demo-qlora"])


def test_global_cli_flags_are_not_settings(tmp_path):
    """--threads and --verbose belong to the process, not to a run: no YAML key sets them;
    TrainingArguments' own --debug stays a setting."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("method: lora\nthreads: 2\n")
    with pytest.raises(UserError, match="unknown setting 'threads'"):
        parse_cli([*BASE, "--config", str(cfg)])
    cfg.write_text("method: lora\ndebug: underflow_overflow\n")
    assert parse_cli([*BASE, "--config", str(cfg)])[1].debug


def test_demo_configs_mirror_the_demo_settings():
    """The shipped demo-*.yaml are the CLI spelling of the demo's runs: they must not drift."""
    from galaxy_llava.config import read_yaml
    from galaxy_llava.toy.demo import DEMO_RUNS, DEMO_TRAIN

    for name, (method, targets) in DEMO_RUNS.items():
        cfg = read_yaml(shipped_configs()[f"demo-{name}"])
        assert cfg["method"] == method
        assert cfg.get("caption_targets", "caption") == targets.get("caption_targets", "caption")
        for key, value in {**DEMO_TRAIN[method], **targets}.items():
            assert cfg[key] == value, (name, key)
        parse_cli([*BASE, "--config", str(shipped_configs()[f"demo-{name}"])])  # valid flags


def test_saved_settings_reproduce_the_run_from_any_folder(tmp_path, monkeypatch):
    """config.yaml holds what a resume needs: parsing it back, from another working directory,
    gives the same arguments (the data folder typed relative is found where it was)."""
    import dataclasses

    import yaml

    monkeypatch.chdir(tmp_path)
    ft, args = parse_cli([*BASE, "--method", "lora", "--learning_rate", "2e-4",
                          "--report_to", "tensorboard", "--save_steps", "5", "--lora_r", "4"])
    saved = settings_to_save(ft, args)
    assert saved["data"] == str(tmp_path / "D") and "output_dir" not in saved
    out = tmp_path / "OUT"
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    ft2, args2 = parse_cli(["--output_dir", "../OUT", "--resume_from_checkpoint", "last"])
    assert ft2 == dataclasses.replace(ft, data=str(tmp_path / "D"))
    for key in ("learning_rate", "report_to", "save_steps", "per_device_train_batch_size",
                "optim", "seed", "num_train_epochs"):
        assert getattr(args2, key) == getattr(args, key), key


def test_yaml_takes_the_flags_names(tmp_path):
    """``model:`` and ``data:`` in a --config YAML work like --model and --data (and like the
    Python API's keyword arguments); two names of one setting are refused."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: m/x\ndata: D2\nmethod: lora\noutput-dir: OUT\n")
    ft, args = parse_cli(["--config", str(cfg)])
    assert (ft.model_name_or_path, ft.data, args.output_dir) == ("m/x", "D2", "OUT")
    ft2, _ = parse_settings({"model": "m/x", "data": "D2", "method": "lora", "output_dir": "OUT"})
    assert ft2 == ft
    cfg.write_text("model: m/x\nmodel_name_or_path: m/y\nmethod: lora\n")
    with pytest.raises(UserError, match="'model' and 'model_name_or_path' .* same setting"):
        parse_cli([*BASE, "--config", str(cfg)])


def test_trainingarguments_debug_is_a_yaml_key(tmp_path):
    """--debug on the command line is galaxy-llava's traceback switch; TrainingArguments' own
    debug modes stay reachable from the YAML."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("method: lora\ndebug: underflow_overflow\n")
    _, args = parse_cli([*BASE, "--config", str(cfg)])
    assert [str(getattr(d, "value", d)) for d in args.debug] == ["underflow_overflow"]


def test_the_trainers_progress_bar_shows_with_quiet_libraries():
    """The CLI sets transformers' log level to errors; left unset, disable_tqdm would follow it
    and hide the bar (its ETA) and the logged loss."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    try:
        hf_logging.set_verbosity_error()
        _, args = parse_cli([*BASE, "--method", "lora"])
        assert args.disable_tqdm is False
        _, args = parse_cli([*BASE, "--method", "lora", "--disable_tqdm", "true"])
        assert args.disable_tqdm is True  # still the user's to turn off
    finally:
        hf_logging.set_verbosity(before)


def test_cached_help_is_the_parsers_help(monkeypatch):
    """The help drawn from the cached flags equals the full parser's, defaults (galaxy-llava's,
    such as logging_steps 10) included."""
    from galaxy_llava.training.arguments import help_parser, help_spec

    monkeypatch.setenv("COLUMNS", "100")
    parser = build_parser()
    text = parser.format_help()
    assert help_parser(json.loads(json.dumps(help_spec(parser)))).format_help() == text
    assert "Log every X updates steps" in text and "(default: 10)" in text
    flat = " ".join(text.split())
    assert "--debug show the traceback" in flat  # the switch the command line has


def test_train_help_without_transformers_after_the_first_time(tmp_path):
    """`galaxy-llava train --help` reads its flags from the user's cache after the first call:
    transformers (and torch) are not imported, and the text is the same."""
    code = ("import sys; from galaxy_llava.cli import main; main(['train', '--help']); "
            "print('transformers' in sys.modules, 'torch' in sys.modules, file=sys.stderr)")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "COLUMNS": "100"}
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           text=True, timeout=300) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr
    assert runs[0].stderr.split() == ["True", "True"]  # the first call builds the parser
    assert runs[1].stderr.split() == ["False", "False"]
    assert runs[0].stdout == runs[1].stdout and "--learning_rate" in runs[1].stdout
    assert len(list((tmp_path / "galaxy-llava").glob("train-help-*.json"))) == 1
