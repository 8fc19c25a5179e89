"""Fine-tuning on ``transformers.Trainer``: :class:`GalaxyTrainer` adds the exact fast path (the
loss only at label positions, the frozen encoder's output cached), :func:`run_training` is the
recipe in named phases: settings -> data -> model -> features -> fit -> save.

Everything else is the Trainer's: TrainingArguments, optimizers and schedules, gradient
accumulation, bf16, checkpoints and ``resume_from_checkpoint``, ``report_to`` (TensorBoard, W&B,
MLflow), DDP under ``torchrun`` / ``accelerate launch``, FSDP and DeepSpeed, ``push_to_hub``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from transformers import Trainer, TrainerCallback

from galaxy_llava import outputs
from galaxy_llava.config import FinetuneArguments
from galaxy_llava.errors import UserError
from galaxy_llava.io import read_json_object, write_json, write_text
from galaxy_llava.metrics import collapse_warning
from galaxy_llava.modelcard import training_settings
from galaxy_llava.models.encoding import IGNORE_INDEX
from galaxy_llava.models.folders import is_local
from galaxy_llava.models.preflight import preflight_model
from galaxy_llava.models.registry import family_for
from galaxy_llava.records import dataset_folder, load_records
from galaxy_llava.run_layout import WEIGHTS
from galaxy_llava.saving import install_weights
from galaxy_llava.training import run_folder
from galaxy_llava.training.accelerate_fsdp_cpu import enable_fsdp_on_cpu
from galaxy_llava.training.arguments import CONFIG_FILE, parse_settings, settings_to_save
from galaxy_llava.training.batches import CaptionDataset, Collator
from galaxy_llava.training.resume import check_fits, read_checkpoint


# Validation galaxies described after training to catch a collapsed model (seconds on a CPU).
COLLAPSE_CHECK = 64
HUB_ERRORS = ("OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectError",
              "ConnectionError", "HfHubHTTPError")


class GalaxyTrainer(Trainer):
    """``Trainer`` whose loss is the mean cross-entropy over caption tokens (caption + EOS),
    token-weighted across gradient accumulation and processes, with ``lm_head`` applied only at
    label positions (``logits_to_keep`` = the batch's ``label_mask``) when ``label_only_loss``:
    the same value without the [batch, length, vocabulary] logits."""

    loss_is_scaled_for_ga = True  # compute_loss divides by the accumulated token count itself

    def __init__(self, *args, label_only_loss: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.label_only_loss = label_only_loss

    def create_accelerator_and_postprocess(self):
        """FSDP on CPU processes too (see :mod:`.accelerate_fsdp_cpu`)."""
        super().create_accelerator_and_postprocess()
        if enable_fsdp_on_cpu(self.accelerator.state, self.args.fsdp_plugin_args):
            self.is_fsdp_enabled = True

    def _load_best_model(self):
        """``--load_best_model_at_end``: the best checkpoint's weights (see
        :meth:`_load_full_checkpoint`)."""
        if not self._load_full_checkpoint(self.state.best_model_checkpoint):
            super()._load_best_model()

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """``--resume_from_checkpoint``: the checkpoint's weights (see
        :meth:`_load_full_checkpoint`); without this a resumed full fine-tune silently went on
        from the base model's weights with the checkpoint's optimizer state."""
        if model is not None or not self._load_full_checkpoint(resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_full_checkpoint(self, folder) -> bool:
        """Load a full model's checkpoint ``folder`` into the model and say whether it did.

        The Trainer's own load (``load_state_dict(strict=False)``) matches none of the keys
        ``save_pretrained`` wrote in transformers 5 (the checkpoint layout, such as LLaVA's
        ``language_model.model.*``) and loads nothing, with only a log line to say so.
        ``from_pretrained`` maps them; its tensors are then copied in, every key required.
        Adapters (peft loads its own) and sharded models keep the Trainer's way (False)."""
        from peft import PeftModel

        model = self.accelerator.unwrap_model(self.model)
        if isinstance(model, PeftModel) or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return False
        saved = type(model).from_pretrained(folder, dtype=model.dtype, use_safetensors=True)
        model.load_state_dict(saved.state_dict(), strict=True)
        return True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels, mask = inputs.pop("labels"), inputs.pop("label_mask")
        if self.label_only_loss:
            outputs = model(**inputs, logits_to_keep=mask, use_cache=False)
            logits, targets = outputs.logits, labels[:, 1:][mask[:, :-1]]
        else:
            outputs = model(**inputs, use_cache=False)
            logits, targets = outputs.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
        total = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX,
                                reduction="sum")
        if num_items_in_batch is None:
            loss = total / (targets != IGNORE_INDEX).sum().clamp(min=1)
        else:
            loss = total / num_items_in_batch
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                loss = loss * self.args.world_size  # DDP averages the processes' gradients
        return (loss, outputs) if return_outputs else loss


class SettingsCallback(TrainerCallback):
    """Write the run's settings (``config.yaml``) as its first step begins: a start or resume
    that fails before training really starts leaves the saved settings as they were."""

    def __init__(self, path: Path, text: str):
        self.path, self.text = path, text

    def on_step_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.text is not None:
            write_text(self.path, self.text)
            self.text = None


class LossLogCallback(TrainerCallback):
    """Append each logged loss to ``RUN/loss_log.jsonl`` as it comes (main process only)."""

    def __init__(self, run: Path):
        self.run = run

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            rows = run_folder.loss_log([dict(logs, step=state.global_step, epoch=state.epoch)])
            if rows:
                run_folder.append_loss_log(self.run, rows)


class EpochCallback(TrainerCallback):
    """Tell the training set which epoch begins, so vote-drawn captions
    (``--caption_targets votes``) are a function of (seed, epoch, galaxy). The Trainer sets
    ``state.epoch`` to ``epoch + steps done / steps per epoch`` and restores it on resume, so its
    floor at an epoch's start is that epoch in a fresh and in a resumed run alike."""

    def __init__(self, dataset: CaptionDataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(math.floor(state.epoch or 0))


# ----------------------------------------------------------------- entry points


def train(model: str | None = None, data: str | os.PathLike | None = None,
          method: str | None = None, output_dir: str | os.PathLike | None = None,
          config: str | os.PathLike | None = None, **settings) -> dict:
    """Fine-tune ``model`` on ``data``'s train split; returns the run's metrics.

    ``settings``: any FinetuneArguments or TrainingArguments field by name (``learning_rate``,
    ``num_train_epochs``, ``resume_from_checkpoint="last"``, ...); ``config``: a YAML file."""
    named = dict(model_name_or_path=model, data=None if data is None else str(data),
                 method=method, output_dir=None if output_dir is None else str(output_dir))
    finetune, args = parse_settings({**named, **settings}, None if config is None else str(config))
    return run_training(finetune, args)


# ----------------------------------------------------------------- the recipe


def _load_data(ft: FinetuneArguments, main: bool) -> tuple[list[dict], list[dict]]:
    records = load_records(ft.data, allow_outside=ft.allow_outside_paths)
    train_recs = [r for r in records if r.get("split") == "train"]
    val_recs = [r for r in records if r.get("split") == "validation"]
    if not train_recs:
        raise UserError(f"{ft.data} has no train split; prepare it with `galaxy-llava prepare`")
    if not val_recs and main:
        print("note: no validation split; validation loss is skipped")
    return train_recs, val_recs


def _vote_captions(ft: FinetuneArguments, records: list[dict], seed: int):
    """The caption drawer of ``--caption_targets votes`` (None for ``caption``): the dataset's
    rule set and ``min_votes`` come from its ``manifest.json``; records without the rule set's
    vote columns are refused in one line."""
    if ft.caption_targets != "votes":
        return None
    from galaxy_llava.vote_captions import VoteCaptions

    manifest = read_json_object(dataset_folder(ft.data) / "manifest.json")
    if not isinstance(manifest.get("rules"), str):
        raise UserError(f"--caption_targets votes needs the rule set {ft.data} was prepared with "
                        "(its manifest.json); prepare it with `galaxy-llava prepare`")
    min_votes = manifest.get("min_votes")
    return VoteCaptions(records, manifest["rules"], 5 if min_votes is None else int(min_votes),
                        seed)


def _setup_model(ft: FinetuneArguments, args):
    """The base model with its encoder frozen, wrapped in LoRA for lora/qlora."""
    from galaxy_llava.models.adapt import apply_lora, freeze_vision_encoder, qlora_config
    from galaxy_llava.models.loading import load_config, load_model

    quant = dtype = None
    if ft.method == "qlora":
        quant = qlora_config(family_for(load_config(ft.model_name_or_path, ft.trust_remote_code)))
        dtype = torch.bfloat16
    model, processor = load_model(ft.model_name_or_path, device=args.device,
                                  dtype=dtype or torch.float32,
                                  trust_remote_code=ft.trust_remote_code,
                                  quantization_config=quant)
    if is_local(ft.model_name_or_path) and Path(ft.model_name_or_path).exists():
        ft.model_name_or_path = str(Path(ft.model_name_or_path).resolve())
    freeze_vision_encoder(model)
    if quant is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=bool(args.gradient_checkpointing))
    if ft.method in ("lora", "qlora"):
        model = apply_lora(model, ft.lora_r, ft.lora_alpha, ft.lora_dropout, ft.lora_projector,
                           ft.lora_target_modules)
    return model, processor, family_for(model)


def _setup_features(ft, args, model, family, processor, paths, main):
    """The feature store of every image (None when the cache is off)."""
    from galaxy_llava.training.feature_cache import build_feature_store

    if ft.feature_cache == "off":
        return None
    if not family.cacheable:
        if main:
            print(f"note: {family.name} models train without the feature cache (its encoder "
                  "output cannot be replayed exactly)")
        return None
    # Under bf16 autocast the projector casts its input to bf16 anyway: storing bf16 is exact.
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    return build_feature_store(
        model, family, processor, paths, mode=ft.feature_cache, dtype=dtype, device=args.device,
        batch_size=ft.feature_batch_size, autocast_dtype=torch.bfloat16 if args.bf16 else None,
        cache_dir=ft.feature_cache_dir or Path(args.output_dir) / "cache",
        model_name=ft.model_name_or_path, progress=main)


def _sharded(model) -> bool:
    """Whether FSDP holds this process's parameters as shards (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _start_step(checkpoint: Path | None) -> int:
    if checkpoint is None:
        return 0
    return int(json.loads((checkpoint / "trainer_state.json").read_text())["global_step"])


def run_training(ft: FinetuneArguments, args) -> dict:
    """Train under parsed settings; writes the RUN folder (see :mod:`.run_folder`)."""
    from galaxy_llava.models.adapt import count_parameters

    t_start = time.time()
    run, main, world = Path(args.output_dir), args.process_index == 0, args.world_size
    if main:
        run_folder.recover(run)  # a start killed while setting aside or moving in a run
    resume = run_folder.checkpoint_to_resume(run, args.resume_from_checkpoint)
    if resume is None:  # never into a file, a dataset, a model or someone's folder
        outputs.check_kind(run, "run", flag="--output_dir",
                           overwrite_flag="--overwrite_output_dir")
        run_folder.check_fresh(run, ft.overwrite_output_dir)
    # Every file the Trainer will load from the checkpoint, as it loads them: one line now,
    # not an internal error once the run has started writing.
    checkpoint = read_checkpoint(resume, ft.method) if resume is not None else None
    work = run_folder.work_folder(run, resume)  # RUN, or RUN/.next-run beside a previous run
    preflight_model(ft.model_name_or_path)  # damaged weights: one line, before any loading
    train_recs, val_recs = _load_data(ft, main)
    # Vote targets: the val set keeps its epoch-0 draws, so its loss compares like with like.
    train_draw, val_draw = (_vote_captions(ft, recs, args.seed) for recs in (train_recs, val_recs))
    if not val_recs:
        args.eval_strategy = "no"
    from transformers import set_seed

    set_seed(args.seed)  # before the LoRA weights are drawn, as the Trainer seeds only itself
    model, processor, family = _setup_model(ft, args)
    if checkpoint is not None:  # Trainer.get_decay_parameter_names reads no instance state
        check_fits(checkpoint, model, GalaxyTrainer.get_decay_parameter_names(None, model))
    ft.prompt = ft.prompt or family.default_prompt(processor)
    paths = list(dict.fromkeys(r["image"] for r in train_recs + val_recs))
    t_feat = time.time()
    store = _setup_features(ft, args, model, family, processor, paths, main)
    feature_seconds = time.time() - t_feat
    rows = {p: i for i, p in enumerate(paths)}
    train_set = CaptionDataset(train_recs, processor, family, ft.prompt, store, rows, train_draw)
    val_set = (CaptionDataset(val_recs, processor, family, ft.prompt, store, rows, val_draw)
               if val_recs else None)
    settings = yaml.safe_dump(settings_to_save(ft, args), sort_keys=False)  # output_dir: RUN
    if args.push_to_hub and not args.hub_model_id:
        args.hub_model_id = run.absolute().name  # the Trainer names the repository by its folder
    # The folder changes only now that data and model have loaded: a typo leaves nothing behind.
    if main:
        for folder in dict.fromkeys((run, work)):
            run_folder.tidy(folder)  # unfinished checkpoints and temporaries of killed runs
    existed = work.exists()
    if main:
        work.mkdir(parents=True, exist_ok=True)
        if resume is None:  # kept until this start has a checkpoint: a failure puts it back
            run_folder.set_aside(work)
    # The Trainer's checkpoints and TensorBoard events go there; absolute, the checkpoint paths
    # it records (the best one, for --load_best_model_at_end) hold when resumed from elsewhere.
    args.output_dir = str(work.resolve())
    start = _start_step(resume)
    hook = family.cached_features(model) if store is not None else contextlib.nullcontext()
    try:
        fsdp = args.fsdp_plugin_args
        if fsdp and not fsdp.get("transformer_cls_names_to_wrap") and not fsdp.get("min_num_params"):
            fsdp["transformer_cls_names_to_wrap"] = ",".join(family.fsdp_wrap_classes(model))
        trainable, total = count_parameters(model)
        effective = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
        if main:
            print(f"{ft.method}: {trainable:,} trainable of {total:,} parameters "
                  f"({100 * trainable / total:.2f}%) on {args.device}, {world} process(es); "
                  f"effective batch {effective} = {args.per_device_train_batch_size} per device x "
                  f"{args.gradient_accumulation_steps} accumulation x {world}")

        trainer = GalaxyTrainer(
            model=model, args=args, train_dataset=train_set, eval_dataset=val_set,
            data_collator=Collator(processor.tokenizer.pad_token_id, family=family,
                                    processor=processor), processing_class=processor,
            callbacks=[SettingsCallback(work / CONFIG_FILE, settings), LossLogCallback(work),
                       EpochCallback(train_set)],
            label_only_loss=ft.label_only_loss)
        with hook:
            result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except BaseException as e:
        if main and resume is None and not run_folder.checkpoints(work):
            # Nothing resumable was made: leave the folder as it was, so the retry just works.
            run_folder.restore_aside(work)
            if not existed and not any(work.iterdir()):
                work.rmdir()
        elif main and resume is None:
            run_folder.drop_aside(work)  # the new start is resumable: it replaces the killed one
        if type(e).__name__ in HUB_ERRORS:  # push_to_hub with the Hub unreachable
            raise UserError(f"cannot reach the Hugging Face Hub ({type(e).__name__}); "
                            "train without --push_to_hub or go online") from None
        raise
    if main and resume is None:
        run_folder.drop_aside(work)
    metrics_path = work / "train_metrics.json"
    if resume is not None and trainer.state.global_step == start and metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text())
        if main:
            if work != run:
                run_folder.publish(run)  # finished before a kill could move it in
            print(f"{run} already finished {start} steps; raise --num_train_epochs or "
                  "--max_steps to train further")
        return metrics
    _save_final(trainer, processor, work, ft, main, name=run.name)  # the best checkpoint's, if asked
    best = trainer.state.best_model_checkpoint if args.load_best_model_at_end else None
    log = run_folder.loss_log(trainer.state.log_history)
    train_loss = [e["loss"] for e in log if e["split"] == "train"]
    metrics = {
        "method": ft.method, "model": ft.model_name_or_path, "device": str(args.device),
        "world_size": world, "precision": "bf16" if args.bf16 else "fp32",
        "distributed": trainer.accelerator.distributed_type.value,
        "sharded_parameters": _sharded(trainer.model),
        "feature_cache": ft.feature_cache, "label_only_loss": ft.label_only_loss,
        "caption_targets": ft.caption_targets,
        "train_samples": len(train_recs), "val_samples": len(val_recs),
        "steps": trainer.state.global_step, "epochs": args.num_train_epochs,
        "batch_size": args.per_device_train_batch_size, "effective_batch_size": effective,
        "lr": args.learning_rate, "trainable_parameters": trainable, "total_parameters": total,
        "wall_seconds": time.time() - t_start, "feature_cache_seconds": feature_seconds,
        "train_seconds": result.metrics.get("train_runtime"),
        "samples_per_second": result.metrics.get("train_samples_per_second"),
        # The last logged loss; a run shorter than logging_steps has only the Trainer's mean.
        "final_train_loss": train_loss[-1] if train_loss else result.training_loss,
        "val_losses": [{"epoch": e["epoch"], "step": e["step"], "loss": e["loss"]}
                       for e in log if e["split"] == "validation"],
        "best_checkpoint": Path(best).name if best else None,
    }
    if main and val_recs and not metrics["sharded_parameters"]:
        metrics["collapse_warning"] = collapse_check(
            trainer.accelerator.unwrap_model(trainer.model), processor, val_recs, ft.prompt)
        if metrics["collapse_warning"]:
            print(metrics["collapse_warning"], file=sys.stderr, flush=True)
    if main:
        run_folder.write_loss_log(work, log)
        run_folder.plot_losses(log, work / "loss_curve.png")
        write_json(metrics_path, metrics)
        if best:
            print(f"kept the weights of the best checkpoint, {Path(best).name} "
                  f"({args.metric_for_best_model} {trainer.state.best_metric:.4g})")
        if work != run:
            run_folder.publish(run)  # the previous run's outputs replaced by this one's
        print(f"trained {metrics['steps']} steps in {metrics['train_seconds'] or 0:.0f} s "
              f"({metrics['samples_per_second'] or 0:.2f} samples/s); final train loss "
              f"{metrics['final_train_loss']}; wrote {run}")
    return metrics


def collapse_check(model, processor, val_recs: list[dict], prompt: str,
                   limit: int = COLLAPSE_CHECK) -> str | None:
    """Describe up to ``limit`` validation galaxies as ``describe`` would and return
    :func:`galaxy_llava.metrics.collapse_warning`'s line (or None): a falling validation loss
    does not show a model that answers every image alike."""
    from galaxy_llava.generate import describe_images

    chosen = val_recs[:limit]
    was_training = model.training
    model.eval()
    try:
        texts = describe_images(model, processor, [r["image"] for r in chosen], prompt,
                                progress=False)
    finally:
        model.train(was_training)
    return collapse_warning(texts, [r.get("text") for r in chosen],
                            what="validation answers after training")


def _save_final(trainer: GalaxyTrainer, processor, run: Path, ft: FinetuneArguments,
                main: bool, name: str) -> None:
    """``RUN/adapter/`` (LoRA) or ``RUN/model/`` (full), written whole or not at all: every
    process takes part in ``save_model`` (FSDP gathers the shards), the main one completes the
    folder (chat template, ``describe``'s generation config, a model card with these training
    settings; ``name``: the run's) and renames it."""
    from peft import PeftModel

    is_adapter = isinstance(trainer.accelerator.unwrap_model(trainer.model), PeftModel)
    kind = WEIGHTS["adapter" if is_adapter else "full"]  # the weights folder's kind and name
    partial = run / f".{kind}.partial"
    if main:
        shutil.rmtree(partial, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(partial))
    if main:
        val = trainer.eval_dataset
        training = training_settings(ft, trainer.args, steps=trainer.state.global_step,
                                     train_samples=len(trainer.train_dataset),
                                     val_samples=len(val) if val is not None else 0)
        install_weights(run, partial, processor, ft.prompt, ft.model_name_or_path, kind,
                        model=trainer.accelerator.unwrap_model(trainer.model), training=training,
                        name=name)
    trainer.accelerator.wait_for_everyone()
