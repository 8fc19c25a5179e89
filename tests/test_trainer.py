"""The Trainer-based fine-tuning: the exact fast path, learning, frozen encoder, resume, outputs,
TensorBoard, data parallel, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from galaxy_llava.cli import main as cli_main
from galaxy_llava.errors import UserError
from galaxy_llava.models.encoding import IGNORE_INDEX
from galaxy_llava.training.trainer import GalaxyTrainer, train

pytestmark = pytest.mark.usefixtures("one_thread")

# Large steps: the tiny model is random-initialised, the reference's 1e-5 would barely move it.
FAST = dict(learning_rate=3e-3, per_device_train_batch_size=4, logging_steps=1, lora_r=8,
            lora_alpha=16)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _compute_loss(model, batch, label_only: bool, num_items=None):
    """GalaxyTrainer.compute_loss itself, on a stand-in for the Trainer's state."""
    me = SimpleNamespace(label_only_loss=label_only,
                         args=SimpleNamespace(average_tokens_across_devices=True, world_size=1))
    return GalaxyTrainer.compute_loss(me, model, batch, num_items_in_batch=num_items)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_cached_and_label_only_losses_equal_the_plain_hf_forward(tiny_model_dir, prepared_dir,
                                                                  method, make_trainable):
    """Loss and every trainable gradient of the trainer's loss, with and without the feature
    cache and the label-only lm_head, equal those of the plain HF forward (pixels through the
    whole model, full logits, HF's own loss on the labels)."""
    from galaxy_llava.models.registry import family_for
    from galaxy_llava.records import load_records
    from galaxy_llava.training.batches import CaptionDataset, Collator
    from galaxy_llava.training.feature_cache import build_feature_store

    torch.manual_seed(0)
    model, processor = make_trainable(tiny_model_dir, method)
    family = family_for(model)
    records = load_records(prepared_dir, "train")[:4]
    paths = [r["image"] for r in records]
    rows = {p: i for i, p in enumerate(paths)}
    prompt = family.default_prompt(processor)
    collate = Collator(processor.tokenizer.pad_token_id, family=family, processor=processor)
    pixels = collate([CaptionDataset(records, processor, family, prompt)[i] for i in range(4)])
    assert pixels["attention_mask"].min() == 0, "captions of unequal length: padding is exercised"
    store = build_feature_store(model, family, processor, paths, mode="memory",
                                dtype=torch.float32, device=torch.device("cpu"), progress=False)
    cached = collate([CaptionDataset(records, processor, family, prompt, store, rows)[i]
                      for i in range(4)])
    assert torch.equal(cached["input_ids"], pixels["input_ids"])

    def loss_and_grads(fn):
        model.zero_grad(set_to_none=True)
        loss = fn()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                               if p.requires_grad}

    plain = {k: pixels[k] for k in ("input_ids", "attention_mask", "pixel_values", "labels")}
    ref_loss, ref_grads = loss_and_grads(lambda: model(**plain).loss)
    assert ref_grads and all(g.abs().sum() > 0 for n, g in ref_grads.items() if "lora_A" not in n)
    n_labels = int((pixels["labels"][:, 1:] != -100).sum())
    results = {}
    for label_only in (False, True):
        results["pixels", label_only] = loss_and_grads(
            lambda: _compute_loss(model, pixels, label_only, n_labels))
        with family.cached_features(model):
            results["cached", label_only] = loss_and_grads(
                lambda: _compute_loss(model, cached, label_only))
    for key, (loss, grads) in results.items():
        assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-6), key
        assert grads.keys() == ref_grads.keys()
        for n, g in grads.items():
            assert torch.allclose(g, ref_grads[n], rtol=1e-4, atol=1e-6), (key, n)
    assert "get_image_features" not in vars(family.vision_encoder(model))  # hook removed


def test_fast_and_plain_training_runs_end_identical(tiny_model_dir, prepared_dir, tmp_path):
    """Whole LoRA runs with dropout: cached features + label-only loss vs the plain forward."""
    kw = dict(num_train_epochs=2, lora_dropout=0.1, save_strategy="no", **FAST)
    fast = train(str(tiny_model_dir), prepared_dir, "lora", tmp_path / "fast", **kw)
    plain = train(str(tiny_model_dir), prepared_dir, "lora", tmp_path / "plain",
                  feature_cache="off", label_only_loss=False, **kw)
    assert fast["final_train_loss"] == pytest.approx(plain["final_train_loss"], abs=1e-5)
    a, b = (_weights(tmp_path / r / "adapter") for r in ("fast", "plain"))
    assert a.keys() == b.keys() and a
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_training_lowers_loss_keeps_the_encoder_and_writes_a_loadable_run(
        tiny_model_dir, prepared_dir, tmp_path, method):
    from transformers import AutoModelForImageTextToText

    from galaxy_llava.training.arguments import saved_settings

    run = tmp_path / method
    metrics = train(str(tiny_model_dir), prepared_dir, method, run, num_train_epochs=8, **FAST)
    assert metrics["steps"] >= 24  # a few dozen optimizer steps
    log = [json.loads(line) for line in (run / "loss_log.jsonl").read_text().splitlines()]
    tr = [e["loss"] for e in log if e["split"] == "train"]
    val = [e["loss"] for e in log if e["split"] == "validation"]
    assert sum(tr[-3:]) / 3 < 0.85 * sum(tr[:3]) / 3, tr
    assert len(val) == 8 and val[-1] < val[0]
    assert (run / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert saved_settings(run)["method"] == method
    saved = json.loads((run / "train_metrics.json").read_text())
    for key in ("wall_seconds", "samples_per_second", "final_train_loss", "val_losses",
                "device", "precision", "method", "effective_batch_size"):
        assert saved[key] is not None, key
    assert "collapse_warning" in saved  # the validation answers were checked (None or a line)
    assert [c.name for c in run.glob("checkpoint-*")] == [f"checkpoint-{metrics['steps']}"]
    assert not (run / ("adapter" if method == "full" else "model")).exists()

    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).state_dict()
    if method == "full":
        tuned = AutoModelForImageTextToText.from_pretrained(run / "model")
    else:
        from peft import PeftModel

        plain = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
        tuned = PeftModel.from_pretrained(plain, run / "adapter").merge_and_unload()
        cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
        assert "multi_modal_projector" in json.dumps(cfg["target_modules"])  # DESIGN.md, defect 1
    state = tuned.state_dict()
    vision = {k: v for k, v in state.items() if "vision_tower" in k}
    assert vision and all(torch.equal(v, base[k]) for k, v in vision.items())
    proj = "model.multi_modal_projector.linear_1.weight"
    assert not torch.equal(state[proj], base[proj])  # the projector trained in both methods
    lm = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(state[lm], base[lm])


def test_collapse_check_warns_when_every_answer_is_alike(tiny_model_dir, prepared_dir, teach):
    """A model taught one caption for every galaxy answers them alike: one line says so;
    answers as varied as the truth give none."""
    from galaxy_llava.evaluate import load_split
    from galaxy_llava.metrics import collapse_warning
    from galaxy_llava.models.loading import load_model
    from galaxy_llava.records import load_image
    from galaxy_llava.training.trainer import collapse_check

    val = load_split(prepared_dir, "validation")
    assert len({r["text"] for r in val}) > 2  # the check needs a truth with variety
    model, processor = load_model(str(tiny_model_dir))
    model = teach(model, processor, [(load_image(r["image"]), val[0]["text"]) for r in val])
    from galaxy_llava.models.registry import family_for

    line = collapse_check(model, processor, val, family_for(model).default_prompt(processor))
    assert line and "\n" not in line and "collapse to 1 distinct caption" in line
    assert collapse_warning([r["text"] for r in val], [r["text"] for r in val]) is None


def _train_until_its_first_checkpoint(monkeypatch, *args, **kwargs) -> None:
    """``train(*args, **kwargs)`` stopped (KeyboardInterrupt) right after its first checkpoint
    is written, as a kill would leave it."""
    real_save = GalaxyTrainer._save_checkpoint

    def save_then_crash(self, *a, **kw):
        real_save(self, *a, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(GalaxyTrainer, "_save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(*args, **kwargs)
    monkeypatch.setattr(GalaxyTrainer, "_save_checkpoint", real_save)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_ends_with_the_same_weights(method, tiny_model_dir, prepared_dir, tmp_path,
                                           monkeypatch):
    """3 epochs vs 1 epoch + crash + resume from the last checkpoint (LoRA with dropout: RNG
    matters; full: the checkpoint's weights must be loaded, which the Trainer's own load of a
    transformers 5 checkpoint does not do); then resuming the finished run changes nothing."""
    kw = dict(num_train_epochs=3, lora_dropout=0.1, **FAST)
    whole = train(str(tiny_model_dir), prepared_dir, method, tmp_path / "whole", **kw)

    _train_until_its_first_checkpoint(monkeypatch, str(tiny_model_dir), prepared_dir, method,
                                      tmp_path / "split", **kw)
    split = tmp_path / "split"
    assert len(list(split.glob("checkpoint-*"))) == 1
    with pytest.raises(UserError, match="already holds a training run"):
        train(str(tiny_model_dir), prepared_dir, method, split, **kw)
    # Settings come from RUN/config.yaml.
    resumed = train(output_dir=split, resume_from_checkpoint="last")

    weights = "adapter" if method == "lora" else "model"
    a, b = (_weights(tmp_path / r / weights) for r in ("whole", "split"))
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    assert resumed["final_train_loss"] == pytest.approx(whole["final_train_loss"], abs=1e-6)
    logs = [[json.loads(x)["loss"] for x in (tmp_path / r / "loss_log.jsonl").read_text()
             .splitlines()] for r in ("whole", "split")]
    assert logs[0] == pytest.approx(logs[1], abs=1e-6)
    again = train(output_dir=split, resume_from_checkpoint="last")
    assert again == resumed  # a finished run keeps its outputs and timings


def test_vote_targets_resume_trains_on_the_captions_the_uninterrupted_run_drew(
        tiny_model_dir, prepared_dir, tmp_path, monkeypatch):
    """--caption_targets votes: each epoch draws every galaxy's caption afresh from its votes; a
    run killed mid-epoch (step 6 of 4 per epoch) and resumed trains, step by step, on the
    captions the uninterrupted run trained on."""
    trained: list[tuple[int, tuple[str, ...]]] = []
    real_loss = GalaxyTrainer.compute_loss

    def recording(self, model, inputs, *args, **kwargs):
        if model.training:
            tok = self.processing_class.tokenizer
            trained.append((self.state.global_step, tuple(
                tok.decode(row[row != IGNORE_INDEX][:-1]) for row in inputs["labels"])))
        return real_loss(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(GalaxyTrainer, "compute_loss", recording)
    kw = dict(num_train_epochs=3, caption_targets="votes", save_strategy="steps", save_steps=6,
              **FAST)
    whole = train(str(tiny_model_dir), prepared_dir, "lora", tmp_path / "whole", **kw)
    assert whole["caption_targets"] == "votes" and whole["steps"] == 12
    uninterrupted, trained[:] = list(trained), []

    _train_until_its_first_checkpoint(monkeypatch, str(tiny_model_dir), prepared_dir, "lora",
                                      tmp_path / "split", **kw)
    assert [step for step, _ in trained] == list(range(6))
    train(output_dir=tmp_path / "split", resume_from_checkpoint="last")  # from config.yaml
    assert trained == uninterrupted

    records = [json.loads(x) for x in (prepared_dir / "dataset.jsonl").read_text().splitlines()]
    per_epoch = [Counter(c for _, caps in uninterrupted[4 * e:4 * e + 4] for c in caps)
                 for e in range(3)]
    assert all(sum(c.values()) == 16 for c in per_epoch)  # every train galaxy once an epoch
    assert per_epoch[0] != per_epoch[1] != per_epoch[2]  # drawn afresh
    assert per_epoch[0] != Counter(r["text"] for r in records if r["split"] == "train")


def test_yaml_with_hf_names_trains_and_writes_tensorboard_events(tiny_model_dir, prepared_dir,
                                                                 tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tmp_path / "run.yaml"
    cfg.write_text("method: lora\nlearning_rate: 3.0e-3\nnum_train_epochs: 1\n"
                   "per_device_train_batch_size: 2\ngradient_accumulation_steps: 2\n"
                   "logging_steps: 1\nsave_steps: 2\nsave_strategy: steps\n"
                   "report_to: tensorboard\n")
    run = tmp_path / "run"
    assert cli_main(["train", "--config", str(cfg), "--model", str(tiny_model_dir), "--data",
                     str(prepared_dir), "--output_dir", str(run)]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "effective batch 4 = 2 per device x 2 accumulation x 1" in out
    # The Trainer's bar (elapsed<remaining: its ETA) and the logged loss, though the CLI sets
    # transformers' log level to errors (which once hid them through disable_tqdm)
    assert re.search(r"\d+/\d+ \[\d\d:\d\d<\d\d:\d\d", captured.err), captured.err[-500:]
    assert "'loss':" in out
    events = list(run.glob("runs/*/events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    losses = [e.value for e in acc.Scalars("train/loss")]
    assert len(losses) >= 3 and all(v > 0 for v in losses)
    steps = json.loads((run / "train_metrics.json").read_text())["steps"]
    assert sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*")) == [steps]


def test_gradient_checkpointing_gives_the_same_run(tiny_model_dir, prepared_dir, tmp_path):
    kw = dict(max_steps=3, save_strategy="no", eval_strategy="no", **FAST)
    a = train(str(tiny_model_dir), prepared_dir, "full", tmp_path / "a", **kw)
    b = train(str(tiny_model_dir), prepared_dir, "full", tmp_path / "b",
              gradient_checkpointing=True, **kw)
    assert a["final_train_loss"] == pytest.approx(b["final_train_loss"], abs=1e-5)


# ----------------------------------------------------------------- bad input via the CLI


def _cli(capsys, *argv) -> str:
    assert cli_main(["train", *map(str, argv)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_cli_bad_inputs_are_one_line_errors(tiny_model_dir, prepared_dir, tmp_path, capsys):
    good = (prepared_dir / "dataset.jsonl").read_text().splitlines()
    run = tmp_path / "run"
    base = ("--model", tiny_model_dir, "--output_dir", run)

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "dataset.jsonl").write_text("\n".join(good[:2] + ["{oops"] + good[2:]) + "\n")
    assert ":3: malformed JSON" in _cli(capsys, *base, "--data", bad, "--method", "lora")

    rec = json.loads(good[0])
    missing = tmp_path / "missing"
    missing.mkdir()
    (missing / "dataset.jsonl").write_text(json.dumps(dict(rec, image="images/nowhere.jpg")) + "\n")
    assert "nowhere.jpg" in _cli(capsys, *base, "--data", missing, "--method", "lora")

    nosplit = tmp_path / "nosplit"
    nosplit.mkdir()
    val = [json.loads(line) for line in good if json.loads(line)["split"] != "train"]
    for r in val:
        r["image"] = str(prepared_dir / r["image"])
    (nosplit / "dataset.jsonl").write_text("".join(json.dumps(r) + "\n" for r in val))
    assert "outside the folder" in _cli(capsys, *base, "--data", nosplit, "--method", "full")
    assert "no train split" in _cli(capsys, *base, "--data", nosplit, "--method", "full",
                                    "--allow-outside-paths")

    # vote targets need the votes (a dataset prepared before they were kept) and the rule set
    novotes = tmp_path / "novotes"
    shutil.copytree(prepared_dir, novotes)
    recs = [json.loads(line) for line in good]
    (novotes / "dataset.jsonl").write_text("".join(
        json.dumps({k: v for k, v in r.items() if k != "fractions"}) + "\n" for r in recs))
    err = _cli(capsys, *base, "--data", novotes, "--method", "lora", "--caption_targets", "votes")
    assert "carries no vote fractions: --caption_targets votes needs" in err
    nomanifest = tmp_path / "nomanifest"
    shutil.copytree(prepared_dir, nomanifest)
    (nomanifest / "manifest.json").unlink()
    err = _cli(capsys, *base, "--data", nomanifest, "--method", "lora", "--caption_targets",
               "votes")
    assert "--caption_targets votes needs the rule set" in err
    assert "unknown method 'sgd'" in _cli(capsys, *base, "--data", prepared_dir, "--method", "sgd")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 0.1\n")
    err = _cli(capsys, *base, "--data", prepared_dir, "--method", "full", "--config", cfg)
    assert "unknown setting 'lr'" in err
    err = _cli(capsys, "--output_dir", tmp_path, "--data", prepared_dir, "--method", "full",
               "--resume_from_checkpoint", "last")
    assert "not a galaxy-llava training run" in err
    assert "needs a CUDA GPU" in _cli(capsys, *base, "--data", prepared_dir, "--method", "qlora")
    err = _cli(capsys, *base, "--data", prepared_dir, "--method", "lora", "--max_steps", "1",
               "--push_to_hub")
    assert "cannot reach the Hugging Face Hub" in err
    assert not run.exists()  # nothing written for a failed start


def test_a_failed_fresh_run_leaves_nothing_that_blocks_the_retry(tiny_model_dir, prepared_dir,
                                                                  tmp_path, monkeypatch):
    def boom(self, *a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(GalaxyTrainer, "train", boom)
    with pytest.raises(RuntimeError):
        train(str(tiny_model_dir), prepared_dir, "lora", tmp_path / "run", max_steps=1)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------- data parallel


def _launch(tmp_path, module_args, extra=()):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "galaxy_llava", "train", *map(str, module_args), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)


@pytest.mark.slow
def test_torchrun_ddp_two_processes_train_and_only_rank0_writes(tiny_model_dir, prepared_dir,
                                                                tmp_path):
    run = tmp_path / "ddp"
    proc = _launch(tmp_path, ["--model", tiny_model_dir, "--data", prepared_dir, "--method",
                              "lora", "--output_dir", run, "--num_train_epochs", "2",
                              "--per_device_train_batch_size", "2", "--learning_rate", "3e-3",
                              "--logging_steps", "1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trained ") == 1 and proc.stdout.count("trainable of") == 1
    assert "2 process(es); effective batch 4 = 2 per device x 1 accumulation x 2" in proc.stdout
    metrics = json.loads((run / "train_metrics.json").read_text())
    assert metrics["world_size"] == 2 and len(metrics["val_losses"]) == 2
    assert metrics["distributed"] == "MULTI_CPU" and metrics["sharded_parameters"] is False
    n_train = sum(json.loads(x)["split"] == "train"
                  for x in (prepared_dir / "dataset.jsonl").read_text().splitlines())
    assert metrics["steps"] == 2 * -(-n_train // 4)  # 2 processes x 2 per step
    log = [json.loads(x) for x in (run / "loss_log.jsonl").read_text().splitlines()]
    train_losses = [e["loss"] for e in log if e["split"] == "train"]
    assert train_losses[-1] < train_losses[0]
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith("checkpoint-")) == sorted(
        ["adapter", "config.yaml", "galaxy_llava.json", "loss_curve.png", "loss_log.jsonl",
         "train_metrics.json"])


@pytest.mark.slow
def test_torchrun_fsdp_shards_the_model_trains_and_saves_full_weights(tiny_model_dir,
                                                                     prepared_dir, tmp_path):
    """FSDP2 on two CPU processes (gloo): parameters really sharded, loss falls, the encoder
    stays frozen, and the saved model/ holds full weights that load with plain transformers."""
    from transformers import AutoModelForImageTextToText

    run = tmp_path / "fsdp"
    proc = _launch(tmp_path, ["--model", tiny_model_dir, "--data", prepared_dir, "--method",
                              "full", "--output_dir", run, "--num_train_epochs", "2",
                              "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
                              "--logging_steps", "1", "--fsdp", "full_shard auto_wrap",
                              "--fsdp_config", '{"version": 2}'])
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run / "train_metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["distributed"] == "FSDP"
    assert metrics["sharded_parameters"] is True
    log = [json.loads(x) for x in (run / "loss_log.jsonl").read_text().splitlines()]
    train_losses = [e["loss"] for e in log if e["split"] == "train"]
    assert train_losses[-1] < 0.95 * train_losses[0]
    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).state_dict()
    tuned = AutoModelForImageTextToText.from_pretrained(run / "model").state_dict()
    assert tuned.keys() == base.keys()
    assert all(torch.equal(v, base[k]) for k, v in tuned.items() if "vision_tower" in k)
    proj = "model.multi_modal_projector.linear_1.weight"
    assert not torch.equal(tuned[proj], base[proj])


@pytest.mark.slow
def test_torch_compile_trains(tiny_model_dir, prepared_dir, tmp_path):
    """The Trainer's torch_compile runs our loss path (one step: compiling dominates on a CPU)."""
    kw = dict(max_steps=1, save_strategy="no", eval_strategy="no", **FAST)
    plain = train(str(tiny_model_dir), prepared_dir, "full", tmp_path / "plain", **kw)
    compiled = train(str(tiny_model_dir), prepared_dir, "full", tmp_path / "compiled",
                     torch_compile=True, **kw)
    assert compiled["final_train_loss"] == pytest.approx(plain["final_train_loss"], rel=1e-4)
