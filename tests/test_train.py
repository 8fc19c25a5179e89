"""Trainer tests: config, the exact fast path, learning, frozen tower, resume, outputs, DDP, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from galaxy_llava import checkpoints as ckpt
from galaxy_llava.cli import main as cli_main
from galaxy_llava.config import TrainConfig, load_config, parse_set
from galaxy_llava.errors import UserError
from galaxy_llava.step import epoch_batches
from galaxy_llava.train import train

# Large steps: the tiny model is random-initialised, the reference's 1e-5 would barely move it.
FAST = dict(lr=3e-3, batch_size=4, log_every=1, lora_r=8, lora_alpha=16)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _vision(state: dict) -> dict:
    return {k: v for k, v in state.items() if "vision_tower" in k}


# ----------------------------------------------------------------- config


def test_method_defaults_follow_the_reference_recipe():
    full = TrainConfig(method="full").resolved()
    lora = TrainConfig(method="lora").resolved()
    assert (full.lr, full.batch_size, full.epochs) == (1e-5, 1, 3)
    assert (lora.lr, lora.batch_size, lora.lora_r, lora.lora_alpha) == (5e-5, 8, 8, 16)
    assert TrainConfig(method="lora", lr=1e-3, batch_size=2).resolved().lr == 1e-3


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: full\nlr: 1e-4\nepochs: 2\nbatch-size: 4\n")
    cfg = load_config(path, {"epochs": 5, **parse_set(["compile=true", "warmup_ratio=0.1"])})
    assert (cfg.method, cfg.lr, cfg.epochs, cfg.batch_size) == ("full", 1e-4, 5.0, 4)
    assert cfg.compile is True and cfg.warmup_ratio == 0.1


@pytest.mark.parametrize("text, needle", [("methd: full\n", "'methd'"), ("- 1\n", "mapping"),
                                          ("lr: fast\n", "lr expects float"), ("a: [\n", "YAML")])
def test_bad_yaml_is_a_user_error(tmp_path, text, needle):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=needle) as e:
        load_config(path, {})
    if "methd" in text:
        assert "valid keys" in str(e.value) and "batch_size" in str(e.value)


def test_unknown_set_key_and_method():
    with pytest.raises(UserError, match="'nope'"):
        parse_set(["nope=1"])
    with pytest.raises(UserError, match="KEY=VALUE"):
        parse_set(["lr"])
    with pytest.raises(UserError, match="unknown method 'qlora'"):
        TrainConfig(method="qlora").resolved()
    with pytest.raises(UserError, match="method"):
        TrainConfig().resolved()


def test_epoch_batches_are_seeded_and_sharded():
    a = epoch_batches(10, 3, seed=1, epoch=0)
    assert a == epoch_batches(10, 3, seed=1, epoch=0)
    assert a != epoch_batches(10, 3, seed=1, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(10))
    r0, r1 = (epoch_batches(11, 2, 1, 0, rank, 2) for rank in (0, 1))
    assert len(r0) == len(r1)  # equal step counts on every rank (DDP)
    assert {i for b in r0 + r1 for i in b} == set(range(11))


# ----------------------------------------------------------------- the fast path is exact


def test_label_only_loss_equals_hf_loss():
    from transformers.loss.loss_utils import ForCausalLMLoss

    from galaxy_llava.features import causal_lm_loss

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(3, 9, 16, requires_grad=True)
    labels = torch.randint(0, 50, (3, 9))
    labels[:, :4] = -100
    labels[2, 6:] = -100  # padding
    ref = ForCausalLMLoss(head(hidden), labels, vocab_size=50)
    for label_only in (True, False):
        got = causal_lm_loss(hidden, labels, head, label_only=label_only)
        assert torch.allclose(got, ref, atol=1e-6)
        g1, = torch.autograd.grad(got, hidden)
        g2, = torch.autograd.grad(ref, hidden, retain_graph=True)
        assert torch.allclose(g1, g2, atol=1e-7)


@pytest.fixture(scope="module")
def tiny_batch(tiny_model_dir, prepared_dir):
    """A real padded batch of 4 training examples with pixel values and cached features."""
    from galaxy_llava.data import Collator, load_records
    from galaxy_llava.features import build_feature_store
    from galaxy_llava.modeling import load_model
    from galaxy_llava.step import TrainData

    model, processor = load_model(tiny_model_dir, device="cpu", dtype=torch.float32)
    records = load_records(prepared_dir, "train")[:4]
    paths = [r["image"] for r in records]
    data = TrainData(records, processor, TrainConfig().prompt, paths, with_pixels=True)
    batch = Collator(processor.tokenizer.pad_token_id)([data[i] for i in range(4)])
    assert batch["attention_mask"].min() == 0, "captions of unequal length: padding is exercised"
    store = build_feature_store(model, processor, paths, mode="memory", dtype=torch.float32,
                                device=torch.device("cpu"), progress=False)
    return batch, store


def _trainable_tiny_model(tiny_model_dir, method):
    """The tiny model, tower frozen, in train mode; LoRA adapters with non-zero B (so they matter)."""
    from galaxy_llava.modeling import apply_lora, freeze_vision_tower, load_model

    model, processor = load_model(tiny_model_dir, device="cpu", dtype=torch.float32)
    freeze_vision_tower(model)
    if method == "lora":
        model = apply_lora(model, r=4, alpha=8, dropout=0.0)
        with torch.no_grad():  # LoRA B starts at 0: make the adapters matter
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
    return model.train(), processor


@pytest.mark.parametrize("method", ["full", "lora"])
def test_cached_and_label_only_equal_plain_hf_forward(tiny_model_dir, tiny_batch, method):
    """Loss and every trainable gradient agree across the 4 combinations; the reference is the
    plain HF forward (pixel values through the whole model, full logits, labels)."""
    from galaxy_llava.features import LlavaTrainModule

    batch, store = tiny_batch
    torch.manual_seed(0)
    model, _ = _trainable_tiny_model(tiny_model_dir, method)
    text = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    results = {}
    for cached in (False, True):
        for label_only in (False, True):
            model.zero_grad()
            inputs = dict(text, **({"features": store.get(batch["image_index"], "cpu")} if cached
                                   else {"pixel_values": batch["pixel_values"]}))
            loss = LlavaTrainModule(model, label_only)(**inputs)
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
            results[cached, label_only] = (loss.detach(), grads)
    ref_loss, ref_grads = results[False, False]
    assert ref_grads and all(g.abs().sum() > 0 for n, g in ref_grads.items() if "lora_A" not in n)
    for key, (loss, grads) in results.items():
        assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-6), key
        for n, g in grads.items():
            assert torch.allclose(g, ref_grads[n], rtol=1e-4, atol=1e-6), (key, n)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_the_trainers_packed_step_equals_plain_hf_forward(tiny_model_dir, prepared_dir, method):
    """What the trainer runs per step (batch_source's packed batch: no attention mask, the image
    span concatenated in, gathered label positions; the lean decoder; the lean LoRA forward) gives
    the loss and gradients of the plain HF forward (pixels, padded batch with its mask, full
    logits, peft's own LoRA), and the packed batch holds what Collator builds."""
    from galaxy_llava.data import Collator, load_records
    from galaxy_llava.features import LlavaTrainModule, build_feature_store
    from galaxy_llava.step import TrainData, TrainStep, batch_source

    torch.manual_seed(0)
    model, processor = _trainable_tiny_model(tiny_model_dir, method)
    records = load_records(prepared_dir, "train")[:4]
    paths = [r["image"] for r in records]
    prompt = TrainConfig().prompt
    pixels = TrainData(records, processor, prompt, paths, with_pixels=True)
    batch = Collator(processor.tokenizer.pad_token_id)([pixels[i] for i in range(4)])
    assert batch["attention_mask"].min() == 0, "captions of unequal length: padding is exercised"

    def loss_and_grads(module, inputs):
        model.zero_grad(set_to_none=True)
        loss = module(**inputs)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                               if p.requires_grad}

    ref_loss, ref_grads = loss_and_grads(
        LlavaTrainModule(model, label_only_loss=False),
        {k: batch[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values")})

    data = TrainData(records, processor, prompt, paths, with_pixels=False)
    store = build_feature_store(model, processor, paths, mode="memory", dtype=torch.float32,
                                device=torch.device("cpu"), progress=False)
    cfg = TrainConfig(method=method, max_grad_norm=None).resolved()
    step = TrainStep(model, cfg, "cpu", total_steps=10, store=store)
    assert step.plain_module._lean, "the lean decoder must match the tiny Llama bitwise"
    if method == "lora":
        assert all("forward" in vars(m) for m in model.modules() if hasattr(m, "lora_A")
                   and hasattr(m, "base_layer"))
    (packed,) = batch_source(data, step, processor).epoch([[0, 1, 2, 3]])
    assert "attention_mask" not in packed.inputs and packed.inputs["image_start"] is not None
    assert torch.equal(packed.inputs["input_ids"], batch["input_ids"])
    keep = batch["labels"][:, 1:] != -100
    assert torch.equal(packed.inputs["label_targets"], batch["labels"][:, 1:][keep])
    assert (packed.samples, packed.padded_len, packed.tokens, packed.label_count) == (
        4, batch["input_ids"].shape[1], int(batch["attention_mask"].sum()), int(keep.sum()))
    loss, grads = loss_and_grads(step.module, packed.inputs)
    assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for n, g in grads.items():
        assert torch.allclose(g, ref_grads[n], rtol=1e-4, atol=1e-6), n


def test_lean_lora_forward_equals_peft_with_the_same_dropout_mask(tiny_model_dir):
    """With dropout on, the lean LoRA forward draws the mask SampledDropout draws and gives
    peft's output and gradients for it."""
    from galaxy_llava.features import use_lean_lora, use_sampled_lora_dropout
    from galaxy_llava.modeling import apply_lora, load_model

    model, _ = load_model(tiny_model_dir, device="cpu", dtype=torch.float32)
    model = apply_lora(model, r=4, alpha=8, dropout=0.2)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    assert use_sampled_lora_dropout(model) > 0
    model.train()
    layer = model.get_base_model().model.language_model.layers[0].mlp.down_proj
    x = torch.randn(3, 5, layer.in_features)

    def run():
        xi = x.clone().requires_grad_()
        torch.manual_seed(7)
        y = layer(xi)
        (y * torch.arange(y.numel()).view_as(y).sin()).sum().backward()
        grads = [xi.grad] + [p.grad.clone() for p in layer.parameters() if p.requires_grad]
        layer.zero_grad(set_to_none=True)
        return y.detach(), grads

    ref, ref_grads = run()  # peft's forward, SampledDropout in it
    assert use_lean_lora(model, sampled_dropout=False) > 0
    got, got_grads = run()
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert not torch.equal(ref, layer.base_layer(x))
    for a, b in zip(got_grads, ref_grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_sampled_dropout_is_bernoulli_dropout():
    """Drop rate p (within 5 sigma), kept values scaled by 1/(1-p), neighbours independent,
    gradients masked alike, reproducible from the global seed, identity in eval mode."""
    import math

    from galaxy_llava.features import SampledDropout

    for p in (0.05, 0.5, 0.9):
        torch.manual_seed(0)
        d = SampledDropout(p).train()
        x = torch.ones(400, 500, requires_grad=True)
        y = d(x)
        dropped = (y == 0).view(-1)
        n = dropped.numel()
        sigma = math.sqrt(p * (1 - p) / n)
        assert abs(dropped.double().mean().item() - p) < 5 * sigma, p
        assert torch.allclose(y.detach().view(-1)[~dropped], torch.tensor(1 / (1 - p)))
        both = (dropped[:-1] & dropped[1:]).double().mean().item()
        assert abs(both - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / n), p
        for quarter in dropped.chunk(4):  # the whole tensor is covered, not just its start
            assert abs(quarter.double().mean().item() - p) < 10 * sigma, p
        y.sum().backward()
        assert torch.equal(x.grad, y.detach())
    torch.manual_seed(3)
    a = SampledDropout(0.1)(torch.ones(50, 7))
    torch.manual_seed(3)
    assert torch.equal(a, SampledDropout(0.1)(torch.ones(50, 7)))
    small = SampledDropout(0.3)
    assert SampledDropout(0.3).eval()(torch.ones(4)).eq(1).all()
    assert small(torch.ones(0)).shape == (0,) and small(torch.ones(1)).shape == (1,)
    with pytest.raises(ValueError):
        SampledDropout(0.0)


def test_fast_and_plain_training_runs_end_identical(tiny_model_dir, prepared_dir, tmp_path):
    """Whole runs (LoRA with dropout): cached + label-only vs the plain HF forward on pixels."""
    kw = dict(epochs=2, lora_dropout=0.1, keep_checkpoints=0, **FAST)
    fast = train(str(tiny_model_dir), prepared_dir, "lora", tmp_path / "fast", **kw)
    plain = train(str(tiny_model_dir), prepared_dir, "lora", tmp_path / "plain",
                  feature_cache="off", label_only_loss=False, **kw)
    assert fast["final_train_loss"] == pytest.approx(plain["final_train_loss"], abs=1e-5)
    a, b = (_weights(tmp_path / r / "adapter") for r in ("fast", "plain"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert not (tmp_path / "fast" / "checkpoints").exists() or not any(
        (tmp_path / "fast" / "checkpoints").iterdir())


def test_shipped_configs_load():
    for path in sorted(Path(__file__).parents[1].glob("configs/*.yaml")):
        cfg = load_config(path).resolved()
        assert cfg.method in ("full", "lora"), path


def test_disk_feature_cache_matches_memory_and_is_reused(tiny_model_dir, prepared_dir, tmp_path):
    from galaxy_llava.data import load_records
    from galaxy_llava.features import build_feature_store
    from galaxy_llava.modeling import load_model

    model, processor = load_model(tiny_model_dir, device="cpu", dtype=torch.float32)
    paths = [r["image"] for r in load_records(prepared_dir, "train")[:5]]
    kw = dict(dtype=torch.float32, device=torch.device("cpu"), progress=False, batch_size=2)
    mem = build_feature_store(model, processor, paths, mode="memory", **kw)
    disk = build_feature_store(model, processor, paths, mode="disk", cache_dir=tmp_path, **kw)
    files = list(tmp_path.glob("features-*.npy"))
    assert len(files) == 1 and not list(tmp_path.glob(".*partial"))
    assert torch.equal(mem.get([4, 0, 2], "cpu"), disk.get([4, 0, 2], "cpu"))
    mtime = files[0].stat().st_mtime_ns
    again = build_feature_store(model, processor, paths, mode="disk", cache_dir=tmp_path, **kw)
    assert files[0].stat().st_mtime_ns == mtime and torch.equal(again.get([1], "cpu"),
                                                                mem.get([1], "cpu"))
    bf = build_feature_store(model, processor, paths, mode="disk", cache_dir=tmp_path,
                             **dict(kw, dtype=torch.bfloat16))
    assert torch.equal(bf.get([3], "cpu"), mem.get([3], "cpu").bfloat16())


# ----------------------------------------------------------------- training end to end


@pytest.mark.parametrize("method", ["full", "lora"])
def test_training_lowers_loss_keeps_tower_and_writes_a_loadable_run(
        tiny_model_dir, prepared_dir, tmp_path, method):
    from transformers import LlavaForConditionalGeneration

    run = tmp_path / method
    metrics = train(str(tiny_model_dir), prepared_dir, method, run, epochs=8, **FAST)
    assert metrics["steps"] >= 24  # a few dozen optimizer steps
    log = [json.loads(line) for line in (run / "loss_log.jsonl").read_text().splitlines()]
    tr = [e["loss"] for e in log if e["split"] == "train"]
    val = [e["loss"] for e in log if e["split"] == "val"]
    assert sum(tr[-3:]) / 3 < 0.85 * sum(tr[:3]) / 3, tr
    assert len(val) == 8 and val[-1] < val[0]
    assert {"step", "epoch", "loss", "split", "lr"} <= set(log[0])
    assert (run / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert load_config(run / "config.yaml").method == method
    assert metrics["trainable_parameters"] < metrics["total_parameters"]
    saved = json.loads((run / "train_metrics.json").read_text())
    for key in ("wall_seconds", "samples_per_second", "tokens_per_second", "final_train_loss",
                "val_losses", "device", "precision", "method"):
        assert saved[key] is not None, key
    assert [c.name for c in (run / "checkpoints").iterdir()] == ["epoch-8"]

    base = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir).state_dict()
    if method == "full":
        assert not (run / "adapter").exists()
        tuned = LlavaForConditionalGeneration.from_pretrained(run / "model")
    else:
        from peft import PeftModel

        assert not (run / "model").exists()
        plain = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir)
        tuned = PeftModel.from_pretrained(plain, run / "adapter").merge_and_unload()
        cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
        assert "multi_modal_projector" in json.dumps(cfg["target_modules"])  # defect 1
    state = {k: v for k, v in tuned.state_dict().items()}
    vision = _vision(state)
    assert vision and all(torch.equal(v, base[k]) for k, v in vision.items())
    proj = "model.multi_modal_projector.linear_1.weight"
    assert not torch.equal(state[proj], base[proj])  # the projector trained in both methods
    lm = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(state[lm], base[lm])


def test_resume_ends_with_the_same_weights(tiny_model_dir, prepared_dir, tmp_path, monkeypatch):
    """LoRA with dropout (RNG matters), 3 epochs vs 1 epoch + crash + --resume."""
    kw = dict(epochs=3, lora_dropout=0.1, **FAST)
    whole = train(str(tiny_model_dir), prepared_dir, "lora", tmp_path / "whole", **kw)

    real_save = ckpt.save_checkpoint

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(str(tiny_model_dir), prepared_dir, "lora", tmp_path / "split", **kw)
    monkeypatch.setattr(ckpt, "save_checkpoint", real_save)
    assert [c.name for c in (tmp_path / "split" / "checkpoints").iterdir()] == ["epoch-1"]
    with pytest.raises(UserError, match="already holds a training run"):
        train(str(tiny_model_dir), prepared_dir, "lora", tmp_path / "split", **kw)
    resumed = train(out=tmp_path / "split", resume=True)  # settings come from RUN/config.yaml

    a, b = (_weights(tmp_path / r / "adapter") for r in ("whole", "split"))
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    assert resumed["final_train_loss"] == pytest.approx(whole["final_train_loss"], abs=1e-6)
    logs = [(tmp_path / r / "loss_log.jsonl").read_text() for r in ("whole", "split")]
    assert [json.loads(x)["loss"] for x in logs[0].splitlines()] == pytest.approx(
        [json.loads(x)["loss"] for x in logs[1].splitlines()], abs=1e-6)


def test_mid_epoch_resume_refuses_another_batch_layout(tiny_model_dir, prepared_dir, tmp_path):
    """A run stopped mid-epoch (max_steps) counts its position in old-size batches: resuming it
    with another batch size would skip or repeat examples, so it is refused by name."""
    run = tmp_path / "run"
    train(str(tiny_model_dir), prepared_dir, "lora", run, epochs=2, max_steps=1, **FAST)
    assert [c.name for c in (run / "checkpoints").iterdir()] == ["step-1"]
    with pytest.raises(UserError, match="mid-epoch.*batch_size"):
        train(out=run, resume=True, batch_size=2, max_steps=3)
    done = train(out=run, resume=True, max_steps=3)  # the same layout resumes
    again = train(out=run, resume=True, max_steps=3)  # finished: outputs and timings kept
    assert again == done


def test_resume_refuses_folders_that_are_not_runs(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        ckpt.check_run_folder(tmp_path / "missing", resume=True, overwrite=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="not a galaxy-llava training run"):
        ckpt.check_run_folder(tmp_path / "other", resume=True, overwrite=False)
    fake = tmp_path / "fake" / "checkpoints" / "epoch-1"
    fake.mkdir(parents=True)
    (fake / "state.json").write_text(json.dumps({"global_step": 3}))
    with pytest.raises(UserError, match="not a galaxy-llava checkpoint"):
        ckpt.check_run_folder(tmp_path / "fake", resume=True, overwrite=False)


# ----------------------------------------------------------------- bad input via the CLI


def _cli(capsys, *argv) -> str:
    assert cli_main(["train", *map(str, argv)]) == 2
    return capsys.readouterr().err


def test_cli_bad_inputs_are_one_line_errors(tiny_model_dir, prepared_dir, tmp_path, capsys):
    good = (prepared_dir / "dataset.jsonl").read_text().splitlines()
    base = ("--model", tiny_model_dir, "--out", tmp_path / "run")

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
    assert "no train split" in _cli(capsys, *base, "--data", nosplit, "--method", "full")

    assert "unknown method 'sgd'" in _cli(capsys, *base, "--data", prepared_dir, "--method", "sgd")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rate: 0.1\n")
    err = _cli(capsys, *base, "--data", prepared_dir, "--method", "full", "--config", cfg)
    assert "'learning_rate'" in err and "valid keys" in err
    assert "'bogus'" in _cli(capsys, *base, "--data", prepared_dir, "--method", "full",
                             "--set", "bogus=1")
    err = _cli(capsys, "--out", tmp_path, "--data", prepared_dir, "--method", "full", "--resume")
    assert "not a galaxy-llava training run" in err
    assert not (tmp_path / "run").exists()  # nothing written for a failed start


# ----------------------------------------------------------------- data parallel


@pytest.mark.slow
def test_torchrun_two_processes_train_and_only_rank0_writes(tiny_model_dir, prepared_dir,
                                                            tmp_path):
    run = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "galaxy_llava.cli", "train", "--model", str(tiny_model_dir),
           "--data", str(prepared_dir), "--method", "lora", "--out", str(run), "--epochs", "2",
           "--batch-size", "2", "--lr", "1e-3", "--set", "log_every=1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trained in") == 1 and proc.stdout.count("trainable of") == 1
    metrics = json.loads((run / "train_metrics.json").read_text())
    assert metrics["world_size"] == 2 and len(metrics["val_losses"]) == 2
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["adapter", "checkpoints", "config.yaml", "galaxy_llava.json", "loss_curve.png",
         "loss_log.jsonl", "train_metrics.json"])
    n_train = sum(json.loads(x)["split"] == "train"
                  for x in (prepared_dir / "dataset.jsonl").read_text().splitlines())
    assert metrics["steps"] == 2 * -(-n_train // 4)  # 2 ranks x batch 2 per step


def test_demo_configs_mirror_the_demo_settings():
    """configs/demo-*.yaml are the CLI spelling of the demo's runs: they must not drift."""
    from pathlib import Path

    from galaxy_llava.config import read_yaml
    from galaxy_llava.demo import DEMO_TRAIN

    root = Path(__file__).resolve().parents[1] / "configs"
    for method, settings in DEMO_TRAIN.items():
        cfg = read_yaml(root / f"demo-{method}.yaml")
        assert cfg["method"] == method
        for key, value in settings.items():
            assert cfg[key] == value, (method, key)


def test_null_setting_is_applied_not_ignored(tmp_path):
    """`--set max_grad_norm=null` (or YAML null) turns clipping off; it is not silently dropped."""
    from galaxy_llava.config import TrainConfig, load_config, parse_set

    cfg = load_config(None, parse_set(["max_grad_norm=null", "max_steps=7"]))
    assert cfg.max_grad_norm is None and cfg.max_steps == 7
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("max_grad_norm: null\n")
    assert load_config(yaml_file).max_grad_norm is None
    assert TrainConfig().max_grad_norm == 1.0
    with pytest.raises(UserError, match="cannot be empty"):
        load_config(None, parse_set(["epochs=null"]))
