"""Save a trained model into a RUN folder and export a run as a plain checkpoint (LoRA merged).
See :mod:`galaxy_llava.models.folders` for the layout.

Every weights folder written here (``RUN/model``, ``RUN/adapter``, an export) is usable blind
from plain transformers / peft: ``generation_config.json`` holds ``describe``'s decoding, the
processor's chat template writes the training prompt token for token, and ``README.md`` is a
model card (:mod:`galaxy_llava.modelcard`)."""

from __future__ import annotations

import copy
import inspect
import os
import shutil
from pathlib import Path

from galaxy_llava.config import DEFAULT_PROMPT
from galaxy_llava.errors import UserError
from galaxy_llava.io import atomic_path
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
    kind = "adapter" if isinstance(model, PeftModel) else "model"
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
    shadow this one), and ``RUN/galaxy_llava.json`` names the run. ``model``: the trained model
    (its family and generation config); ``training``: the card's training settings
    (:func:`galaxy_llava.modelcard.training_settings`); ``name``: the run's, when ``run`` is
    the folder it is built in."""
    from galaxy_llava.models.base import unwrap
    from galaxy_llava.models.registry import family_for

    base_model = abs_if_local(base_model)
    (partial / "training_args.bin").unlink(missing_ok=True)  # a pickle; config.yaml has it all
    method = "lora" if kind == "adapter" else "full"
    finish_folder(partial, kind, processor, family_for(model), prompt,
                  getattr(unwrap(model), "generation_config", None), base_model,
                  name or run.name,
                  method=method, training=training)
    for stale in (run / "adapter", run / "model"):
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(partial, run / kind)
    write_marker(run, kind="run", prompt=prompt, base_model=base_model, method=method)
    return run / kind


def finish_folder(folder: Path, kind: str, processor, family, prompt: str, generation,
                  base_model: str | None, name: str, **marker) -> None:
    """Write beside the weights in ``folder`` (``kind`` "adapter" or "model") what a Hugging Face
    user needs: the processor with :func:`with_chat_template`, :func:`describe_generation_config`
    of ``generation`` (the model's own), the marker (prompt, question, family, base model, and
    ``marker``'s fields) and the model card."""
    from galaxy_llava.modelcard import write_card

    processor, question = with_chat_template(processor, family, prompt)
    processor.save_pretrained(folder)
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

    from galaxy_llava.generate import describe_images

    defaults = inspect.signature(describe_images).parameters
    config = copy.deepcopy(generation) if generation is not None else GenerationConfig()
    for key in _SAMPLING_ONLY:
        setattr(config, key, None)
    config.update(num_beams=defaults["num_beams"].default,
                  max_new_tokens=defaults["max_new_tokens"].default,
                  do_sample=defaults["do_sample"].default,
                  eos_token_id=sorted(set(family.end_ids(tokenizer))),
                  pad_token_id=tokenizer.pad_token_id,
                  no_repeat_ngram_size=0, repetition_penalty=1.0, min_length=0)
    config._from_model_config = False  # generate must not rebuild it from the model's config
    return config


def _not_model_files(folder: str, names: list[str]) -> set[str]:
    """``shutil.copytree``'s ignore: what a Trainer checkpoint keeps beside the model (optimizer,
    scheduler and RNG states, pickled arguments, its state) and an export leaves out."""
    keep = (".safetensors", ".json", ".jinja", ".txt", ".model")
    return {n for n in names if not n.endswith(keep) or n == TRAINER_STATE}


def export_run(run: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write a RUN (or one of its ``checkpoint-N`` folders) as a plain checkpoint (LoRA merged
    into the base weights), with its processor (chat template included), ``describe``'s
    generation config, prompt and model card (the run's training settings and evaluations);
    returns ``out``."""
    import torch

    from galaxy_llava.models.loading import load_adapter_model, load_config
    from galaxy_llava.models.registry import family_for

    run, out = Path(run), Path(out)
    kind = run_kind(run) if run.is_dir() else None
    owner = checkpoint_run(run) if run.is_dir() else None
    if kind == "model" and (run / TRAINER_STATE).is_file():
        kind = "full"  # a full run's checkpoint: its weights are the folder itself
    if kind not in ("adapter", "full"):
        raise UserError(f"{run} is not a galaxy-llava run or checkpoint (no adapter/ or model/ "
                        "folder inside)")
    prompt = read_prompt(run) or DEFAULT_PROMPT
    with atomic_path(out) as tmp:
        if kind == "full":
            from transformers import GenerationConfig

            shutil.copytree(weights_folder(run), tmp, ignore=_not_model_files)
            base = (read_marker(owner or run).get("base_model")
                    or run_settings(owner or run).get("model_name_or_path"))
            config = load_config(str(tmp))
            family = family_for(config)
            processor = family.load_processor(str(tmp))
            family.fix_processor(processor, config)
            generation = (GenerationConfig.from_pretrained(tmp)
                          if (tmp / "generation_config.json").is_file()
                          else GenerationConfig.from_model_config(config))
            marker = read_marker(weights_folder(run))
        else:
            base = adapter_base(run)
            # Merge in fp32 on the CPU (exact), then store in the base checkpoint's dtype.
            saved = getattr(load_config(base), "dtype", None)
            model, processor = load_adapter_model(run, device="cpu", dtype=torch.float32)
            if isinstance(saved, str):
                saved = getattr(torch, saved, None)
            if isinstance(saved, torch.dtype) and saved != torch.float32:
                model = model.to(saved)
            model.save_pretrained(tmp, safe_serialization=True)
            family, generation = family_for(model), model.generation_config
            marker = read_marker(weights_folder(run))
        name = f"{owner.name}-{run.name}" if owner else run.name  # a checkpoint: by its run
        finish_folder(tmp, "model", processor, family, prompt, generation, base, name,
                      method=read_marker(owner or run).get("method")
                      or run_settings(owner or run).get("method"), training=marker.get("training"),
                      evaluations=marker.get("evaluations"))
    return out
