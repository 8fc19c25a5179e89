"""Save a trained model into a RUN folder and export a run as a plain checkpoint (LoRA merged),
written in the layout of the family's published Hub checkpoints (weight names and processor
files), which other engines (vLLM) expect. See :mod:`galaxy_llava.models.folders` for the layout.

Every weights folder written here (``RUN/model``, ``RUN/adapter``, an export) is usable blind
from plain transformers / peft: ``generation_config.json`` holds ``describe``'s decoding, the
processor's chat template writes the training prompt token for token, and ``README.md`` is a
model card (:mod:`galaxy_llava.modelcard`).

It sits above ``models/`` and :mod:`galaxy_llava.modelcard` (whose card it writes) and
:mod:`galaxy_llava.generate` (whose decoding defaults a saved ``generation_config.json`` holds);
``training`` saves through it and the ``export`` command calls it."""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

from galaxy_llava.config import DECODING, DEFAULT_PROMPT
from galaxy_llava.errors import UserError
from galaxy_llava.io import atomic_path
from galaxy_llava.modelcard import write_card
from galaxy_llava.models.base import unwrap
from galaxy_llava.models.registry import family_for
from galaxy_llava.run_layout import WEIGHTS
from galaxy_llava.models.folders import (TRAINER_STATE, abs_if_local, adapter_base,
                                         checkpoint_run, read_marker, read_prompt, run_kind,
                                         run_settings, weights_folder, write_marker,
                                         write_prompt)

# Settings that only steer sampling: unset under beam search (a saved GenerationConfig that keeps
# them with do_sample=False is refused as inconsistent, and generate ignores them anyway).
_SAMPLING_ONLY = ("temperature", "top_k", "top_p", "min_p", "top_h", "typical_p",
                  "epsilon_cutoff", "eta_cutoff")


def save_run_model(model, processor, run: str | os.PathLike, prompt: str = DEFAULT_PROMPT,
                   base_model: str | None = None, training: dict | None = None) -> Path:
    """Save a trained model into a RUN folder: ``RUN/adapter/`` for a peft model, else
    ``RUN/model/``; returns the weights folder. (The trainer saves through ``Trainer.save_model``,
    which gathers FSDP shards, then calls :func:`install_weights` likewise.)"""
    from peft import PeftModel

    run = Path(run)
    kind = WEIGHTS["adapter" if isinstance(model, PeftModel) else "full"]
    partial = run / f".{kind}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    return install_weights(run, partial, processor, prompt,
                           base_model or getattr(model, "name_or_path", None), kind,
                           model=model, training=training)


def install_weights(run: Path, partial: Path, processor, prompt: str, base_model: str | None,
                    kind: str, *, model, training: dict | None = None,
                    name: str | None = None) -> Path:
    """Complete a saved weights folder ``partial`` (processor with the prompt's chat template,
    ``describe``'s generation config, prompt and base model, model card) and rename it to
    ``RUN/adapter`` or ``RUN/model`` in one step; the other kind, if any, is removed (it would
    shadow this one), and ``RUN/galaxy_llava.json`` names the run. ``kind``: the weights
    folder's ("adapter" or "model", :data:`galaxy_llava.run_layout.WEIGHTS` of the run's
    kind "adapter" or "full"). ``model``: the trained model
    (its family and generation config); ``training``: the card's training settings
    (:func:`galaxy_llava.modelcard.training_settings`); ``name``: the run's, when ``run`` is
    the folder it is built in."""
    base_model = abs_if_local(base_model)
    (partial / "training_args.bin").unlink(missing_ok=True)  # a pickle; config.yaml has it all
    method = "lora" if kind == "adapter" else "full"
    finish_folder(partial, kind, processor, family_for(model), prompt,
                  getattr(unwrap(model), "generation_config", None), base_model,
                  name or run.name,
                  method=method, training=training, saved_by="train")
    for stale in (run / w for w in WEIGHTS.values()):
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(partial, run / kind)
    write_marker(run, kind="run", prompt=prompt, base_model=base_model, method=method)
    return run / kind


def finish_folder(folder: Path, kind: str, processor, family, prompt: str, generation,
                  base_model: str | None, name: str, **marker) -> None:
    """Write beside the weights in ``folder`` (``kind`` "adapter" or "model") what a Hugging Face
    user needs: the processor with :func:`with_chat_template` (in the family's published files,
    ``ModelFamily.save_processor``), :func:`describe_generation_config` of ``generation`` (the
    model's own), the marker (prompt, question, family, base model, and ``marker``'s fields:
    ``saved_by`` "train" or "export" makes the card :func:`galaxy_llava.modelcard.update_card`'s
    to edit) and the model card."""
    processor, question = with_chat_template(processor, family, prompt)
    family.save_processor(processor, folder)
    describe_generation_config(generation, family, processor.tokenizer).save_pretrained(folder)
    write_prompt(folder, prompt, kind=kind, base_model=base_model)
    write_marker(folder, question=question, family=family.name, name=name, **marker)
    write_card(folder, kind, name)


def with_chat_template(processor, family, prompt: str):
    """``(processor, question)``: a copy of ``processor`` whose chat template renders one user
    turn of an image and ``question`` exactly as ``prompt`` (see ``ModelFamily.chat_template``),
    so ``apply_chat_template`` gives the training prompt's ids; the original is left as it was."""
    template, question = family.chat_template(processor, prompt)
    processor = copy.copy(processor)
    processor.chat_template = template
    return processor, question


def describe_generation_config(generation, family, tokenizer):
    """A ``GenerationConfig`` that makes a plain ``model.generate(**inputs)`` decode as
    ``galaxy-llava describe`` does (its defaults: beams, new tokens, no sampling; the family's
    end-of-turn token(s) as EOS, the tokenizer's pad, no n-gram blocking, no repetition penalty,
    no minimum length), starting from the model's own ``generation`` config (or none)."""
    from transformers import GenerationConfig

    config = copy.deepcopy(generation) if generation is not None else GenerationConfig()
    for key in _SAMPLING_ONLY:
        setattr(config, key, None)
    config.update(num_beams=DECODING.num_beams, max_new_tokens=DECODING.max_new_tokens,
                  do_sample=DECODING.do_sample,
                  eos_token_id=sorted(set(family.end_ids(tokenizer))),
                  pad_token_id=tokenizer.pad_token_id,
                  no_repeat_ngram_size=0, repetition_penalty=1.0, min_length=0)
    config._from_model_config = False  # generate must not rebuild it from the model's config
    return config


def save_published(model, folder: str | os.PathLike) -> None:
    """``model.save_pretrained(folder)`` with the weight names of the family's published Hub
    checkpoints (``ModelFamily.checkpoint_keys``), whichever layout the model was loaded from.

    transformers 5 renames legacy checkpoint keys on load (``conversion_mapping.py``: e.g.
    ``vision_tower.vision_model.*`` to CLIP's flat ``vision_tower.*``) and on save reverts only
    the renames that loading applied (``model._weight_conversions``); a model built or loaded
    from flat names is saved flat, which vLLM refuses. Setting every rename of the model's
    mapping makes the save write the published names; transformers still loads them, weight
    for weight. (The one place that sets this private attribute; tests/test_saving.py checks the
    names per family.)"""
    from transformers.conversion_mapping import get_model_conversion_mapping

    model._weight_conversions = get_model_conversion_mapping(model, add_legacy=False)
    model.save_pretrained(folder, safe_serialization=True)


def export_run(run: str | os.PathLike, out: str | os.PathLike, *,
               license: str | None = None) -> Path:
    """Write a RUN (or one of its ``checkpoint-N`` folders) as a plain checkpoint in the
    family's published layout (:func:`save_published`; a LoRA merged into the base weights, in
    the base checkpoint's dtype), with its processor (chat template included), ``describe``'s
    generation config, prompt and model card (the run's training settings and evaluations;
    ``license``, else the run's or the base model card's); returns ``out``."""
    import torch

    from galaxy_llava.models.loading import load_adapter_model, load_config, load_model

    run, out = Path(run), Path(out)
    kind = run_kind(run) if run.is_dir() else None
    owner = checkpoint_run(run) if run.is_dir() else None
    if kind == "model" and (run / TRAINER_STATE).is_file():
        kind = "full"  # a full run's checkpoint: its weights are the folder itself
    if kind not in ("adapter", "full"):
        raise UserError(f"{run} is not a galaxy-llava run or checkpoint (no adapter/ or model/ "
                        "folder inside)")
    prompt = read_prompt(run) or DEFAULT_PROMPT
    weights = weights_folder(run)
    base = (read_marker(owner or run).get("base_model")
            or run_settings(owner or run).get("model_name_or_path")) if kind == "full" \
        else adapter_base(run)
    # The saved dtype is kept; a LoRA merges in fp32 on the CPU (exact), then takes it.
    saved = getattr(load_config(str(weights) if kind == "full" else base), "dtype", None)
    if isinstance(saved, str):
        saved = getattr(torch, saved, None)
    saved = saved if isinstance(saved, torch.dtype) else torch.float32
    if kind == "full":
        model, processor = load_model(weights, device="cpu", dtype=saved)
    else:
        model, processor = load_adapter_model(run, device="cpu", dtype=torch.float32)
        model = model.to(saved)
    marker = read_marker(weights)
    name = f"{owner.name}-{run.name}" if owner else run.name  # a checkpoint: by its run
    with atomic_path(out) as tmp:
        save_published(model, tmp)
        finish_folder(tmp, "model", processor, family_for(model), prompt,
                      model.generation_config, base, name,
                      method=read_marker(owner or run).get("method")
                      or run_settings(owner or run).get("method"), training=marker.get("training"),
                      evaluations=marker.get("evaluations"),
                      license=license or marker.get("license"),
                      saved_by="export")
    return out
