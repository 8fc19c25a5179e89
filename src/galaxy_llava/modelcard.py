"""Model cards (``README.md``) for the folders galaxy-llava saves weights in: a run's ``model/``
or ``adapter/`` and an exported checkpoint.

A card carries the Hub metadata (``base_model`` as a Hub id, never a local path;
``license`` when known; ``library_name``; ``pipeline_tag: image-text-to-text``; tags; the source
dataset; the evaluations as ``model-index`` results), the prompt and
the question that writes it through the chat template, the decoding stored in
``generation_config.json``, the training settings, the evaluation table once there is one, and a
usage snippet in plain transformers / peft. It is rendered from what the folder itself holds
(``galaxy_llava.json``: prompt, question, family, base model, ``training``, ``evaluations``), so
:func:`update_card` can add an evaluation later and an export renders its own from the run's.
No torch here.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from galaxy_llava import __version__
from galaxy_llava.config import TAGS
from galaxy_llava.errors import UserError
from galaxy_llava.io import read_json_object, write_text
from galaxy_llava.models.folders import is_local, read_marker, run_kind, write_marker
from galaxy_llava.models.registry import FAMILIES
from galaxy_llava.morphology import ATTRIBUTES
from galaxy_llava.records import dataset_folder

CARD = "README.md"
# A local copy in the Hugging Face cache keeps its Hub id in the folder name.
_CACHED = re.compile(r"(?:^|/)(models|datasets)--([^/]+?)--([^/]+)(?:/|$)")
# The training table: (settings key, label), in this order, rows without a value left out.
TRAINING_ROWS = (
    ("method", "method"), ("learning_rate", "learning rate"), ("num_train_epochs", "epochs"),
    ("max_steps", "max steps"), ("steps", "optimizer steps"),
    ("per_device_train_batch_size", "batch size per device"),
    ("gradient_accumulation_steps", "gradient accumulation steps"), ("world_size", "processes"),
    ("optim", "optimizer"), ("lr_scheduler_type", "learning-rate schedule"),
    ("warmup_steps", "warm-up steps"), ("weight_decay", "weight decay"),
    ("precision", "precision"), ("lora_r", "LoRA rank r"), ("lora_alpha", "LoRA alpha"),
    ("lora_dropout", "LoRA dropout"), ("lora_projector", "projector under LoRA"),
    ("seed", "seed"), ("train_samples", "training galaxies"),
    ("val_samples", "validation galaxies"))
# The evaluation table's rows: per-attribute accuracies, then the caption-level rates.
EVAL_ROWS = tuple((a, f"{a.replace('_', ' ')} accuracy") for a in ATTRIBUTES) + (
    ("exact_match", "exact match (all 7 attributes)"), ("parse_rate", "parse rate"),
    ("hallucination_rate", "hallucination rate"), ("omission_rate", "omission rate"),
    ("mean_length", "mean length (words)"))


def hub_id(name: str | os.PathLike | None, kind: str = "models") -> str | None:
    """``name`` as a Hub id: a Hub id as it is; a local copy in the Hugging Face cache
    (``.../models--org--name/snapshots/...``) by its cache name; any other path None (a card
    must not publish a path of this machine)."""
    if not name:
        return None
    name = str(name)
    cached = _CACHED.search(Path(name).expanduser().as_posix())
    if cached and cached.group(1) == kind:
        return f"{cached.group(2)}/{cached.group(3)}"
    return None if is_local(name) else name


def data_summary(data: str | os.PathLike | None) -> dict:
    """What a card says of a prepared dataset: folder name, rule set, image size and the source
    catalogue's Hub id when it has one (``manifest.json``), and the galaxies it holds in all and
    by type (``stats.json``: what was used, not the ``--n-per-class`` asked for)."""
    if not data:
        return {}
    folder = dataset_folder(data)
    manifest = read_json_object(folder / "manifest.json")
    stats = read_json_object(folder / "stats.json")
    source = manifest.get("source")
    if manifest.get("source_kind") != "hub":
        source = hub_id(source, "datasets")
    classes = stats.get("classes") if isinstance(stats.get("classes"), dict) else {}
    return {"name": folder.name, "rules": manifest.get("rules"),
            "galaxies": stats.get("n_records"), "classes": {t: n for t, n in classes.items() if n},
            "image_size": manifest.get("image_size"), "source": source,
            "hub_config": manifest.get("hub_config")}


def base_license(base: str | os.PathLike | None) -> dict:
    """The license fields (``license``, ``license_name``, ``license_link``) of the base model's
    card: a local folder's ``README.md``, or a Hub model's card where the Hugging Face cache
    holds it (never downloaded: cards are written offline); {} when none is known."""
    from huggingface_hub import ModelCard, try_to_load_from_cache

    if not base:
        return {}
    path = Path(base).expanduser() / CARD
    if not path.is_file() and hub_id(base):
        cached = try_to_load_from_cache(hub_id(base), CARD)
        path = Path(cached) if isinstance(cached, str) else path
    if not path.is_file():
        return {}
    try:
        data = ModelCard.load(path).data.to_dict()
    except Exception:  # a card that is not a Hub card: no license to read
        return {}
    return {k: data[k] for k in ("license", "license_name", "license_link") if data.get(k)}


def owns_card(folder: str | os.PathLike) -> bool:
    """Whether galaxy-llava train or export wrote this weights folder, so its card is ours to
    edit (an evaluation of a base model, a tiny model included, leaves its card alone). Folders
    saved before ``saved_by`` was recorded are recognised by the question their card holds."""
    marker = read_marker(folder)
    return marker.get("saved_by") in ("train", "export") or (
        "saved_by" not in marker and bool(marker.get("question")))


def training_settings(finetune, args, **extra: Any) -> dict:
    """The training settings a card shows, from ``FinetuneArguments`` and ``TrainingArguments``
    (plus ``extra``: steps, sample counts); stored in the weights folder's marker."""
    def plain(value):
        return getattr(value, "value", value)  # the Trainer's enums (optimizer, schedule)

    method = finetune.method
    settings = {
        "method": method, "learning_rate": args.learning_rate,
        "num_train_epochs": args.num_train_epochs,
        "max_steps": args.max_steps if (args.max_steps or 0) > 0 else None,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "world_size": args.world_size, "optim": plain(args.optim),
        "lr_scheduler_type": plain(args.lr_scheduler_type),
        "warmup_steps": args.warmup_steps or None, "weight_decay": args.weight_decay or None,
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        "seed": args.seed, **extra, "data": data_summary(finetune.data)}
    if method in ("lora", "qlora"):
        settings.update(lora_r=finetune.lora_r, lora_alpha=finetune.lora_alpha,
                        lora_dropout=finetune.lora_dropout, lora_projector=finetune.lora_projector)
    return settings


def evaluation_summary(metrics: dict | str | os.PathLike) -> dict:
    """The card's column for one evaluation: an EVAL folder, its ``metrics.json`` or the dict
    ``evaluate`` returns (name, split, data, n, and every :data:`EVAL_ROWS` value; a VLM
    evaluation's grammar-argmax captions as ``grammar``)."""
    if not isinstance(metrics, dict):
        path = Path(metrics)
        path = path / "metrics.json" if path.is_dir() else path
        try:
            metrics = json.loads(path.read_text())
        except (OSError, ValueError):
            raise UserError(f"{path} is not an evaluation's metrics.json") from None
        if not isinstance(metrics, dict) or not metrics.get("complete"):
            raise UserError(f"{path} is not a finished evaluation (no \"complete\": true)")

    def values(m: dict) -> dict:
        attributes = m.get("attributes") or {}
        return {key: (attributes.get(key) or {}).get("accuracy") if key in ATTRIBUTES
                else m.get(key) for key, _ in EVAL_ROWS}

    data = metrics.get("data")
    dataset = data_summary(data) if data else {}
    summary = {"name": metrics.get("name") or metrics.get("kind") or "evaluation",
               "split": metrics.get("split"), "data": Path(data).name if data else None,
               "source": dataset.get("source"), "hub_config": dataset.get("hub_config"),
               "n": metrics.get("n"), "values": values(metrics)}
    if isinstance(metrics.get("grammar"), dict):
        summary["grammar"] = values(metrics["grammar"])
    return summary


def usage_snippet(kind: str, question: str, base: str | None = None,
                  model: str = "path/to/this/folder", image: str = "galaxy.jpg") -> str:
    """Python that describes one image with this folder in plain transformers (``kind``
    "model") or peft ("adapter"), decoding exactly as ``galaxy-llava describe``: the chat
    template writes the training prompt, ``generation_config.json`` holds the beam search."""
    lines = ["from PIL import Image"]
    if kind == "adapter":
        lines += ["from peft import PeftModel",
                  "from transformers import AutoModelForImageTextToText, AutoProcessor, "
                  "GenerationConfig", "",
                  f"BASE = {json.dumps(base or 'path/to/the/base/model')}  # the base model",
                  f"ADAPTER = {json.dumps(model)}  # this folder, or its Hub id",
                  "base = AutoModelForImageTextToText.from_pretrained(BASE)",
                  "# galaxy-llava describe's decoding (peft does not read it from the adapter)",
                  "base.generation_config = GenerationConfig.from_pretrained(ADAPTER)",
                  "model = PeftModel.from_pretrained(base, ADAPTER).merge_and_unload()",
                  "processor = AutoProcessor.from_pretrained(ADAPTER)"]
    else:
        lines += ["from transformers import AutoModelForImageTextToText, AutoProcessor", "",
                  f"MODEL = {json.dumps(model)}  # this folder, or its Hub id",
                  "model = AutoModelForImageTextToText.from_pretrained(MODEL)",
                  "processor = AutoProcessor.from_pretrained(MODEL)"]
    lines += [
        "# The chat template writes the prompt the model was trained on, token for token.",
        "messages = [{\"role\": \"user\", \"content\": [",
        "    {\"type\": \"image\"}, {\"type\": \"text\", \"text\": " + json.dumps(question) + "}]}]",
        "prompt = processor.apply_chat_template(messages, add_generation_prompt=True)",
        f"image = Image.open({json.dumps(image)}).convert(\"RGB\")",
        "inputs = processor(images=image, text=prompt, return_tensors=\"pt\")",
        "output = model.generate(**inputs)  # beam search from generation_config.json",
        "text = processor.decode(output[0, inputs[\"input_ids\"].shape[1]:],",
        "                        skip_special_tokens=True).strip()",
        "print(text)"]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"  # a learning rate, a dropout: 4 significant digits
    return str(value)


def shown_value(key: str, value: float | None) -> float | None:
    """An evaluation value as the card shows it, in the table and in ``model-index`` alike:
    rates in percent and the mean length in words, both to one decimal."""
    if value is None:
        return None
    return round(value if key == "mean_length" else 100 * value, 1)


def _shown(key: str, value: float | None) -> str:
    shown = shown_value(key, value)
    return "-" if shown is None else f"{shown:.1f}" + ("" if key == "mean_length" else "%")


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _training_section(training: dict | None) -> str:
    if not training:
        return ("## Training\n\nSaved without `galaxy-llava train`: no training settings were "
                "recorded.")
    rows = [[label, _fmt(training[key])] for key, label in TRAINING_ROWS
            if training.get(key) is not None]
    data = training.get("data") or {}
    about = []
    if data.get("name"):
        about.append(f"the prepared dataset `{data['name']}`")
    if data.get("source"):
        about.append(f"from [{data['source']}](https://huggingface.co/datasets/{data['source']})"
                     + (f" (config `{data['hub_config']}`)" if data.get("hub_config") else ""))
    classes = ", ".join(f"{n} {t}" for t, n in (data.get("classes") or {}).items())
    details = [(f"{data['galaxies']} galaxies" + (f": {classes}" if classes else ""))
               if data.get("galaxies") else None,
               f"captions under the `{data['rules']}` rules" if data.get("rules") else None,
               f"{data['image_size']} px images" if data.get("image_size") else None]
    details = [d for d in details if d]
    text = "## Training\n\nFine-tuned with `galaxy-llava train` (the Hugging Face Trainer"
    text += f") on {' '.join(about)}" if about else ")"
    text += f" ({'; '.join(details)})." if details else "."
    text += (" The loss is taken on the caption and its end token only; the vision encoder "
             "stays frozen.\n\n")
    return text + _table(["setting", "value"], rows)


def _evaluation_section(evaluations: list[dict]) -> str:
    if not evaluations:
        return ("## Evaluation\n\nNot evaluated yet. `galaxy-llava evaluate --model RUN` scores a "
                "held-out split and adds its table here (for another EVAL folder: "
                "`galaxy_llava.modelcard.update_card(RUN, EVAL)`).")
    columns = []
    for e in evaluations:
        label = f"{e.get('name')} ({e.get('split')}, n={e.get('n')})"
        columns.append((label, e.get("values") or {}))
        if e.get("grammar"):
            columns.append((f"{e.get('name')}, most probable caption", e["grammar"]))
    rows = [[label] + [_shown(key, values.get(key)) for _, values in columns]
            for key, label in EVAL_ROWS]
    data = sorted({e["data"] for e in evaluations if e.get("data")})
    return ("## Evaluation\n\nScored by `galaxy-llava evaluate`"
            + (f" on `{'`, `'.join(data)}`" if data else "")
            + ": each answer is parsed back into the caption's attributes and compared with the "
            "volunteers' consensus, each attribute only where it applies (shape on ellipticals, "
            "bar and arms on spirals). Hallucination: stated attributes the truth lacks; "
            "omission: true attributes left out; parse rate: answers inside the caption "
            "grammar. The same values are in this card's metadata as `model-index` "
            "results.\n\n" + _table(["metric"] + [c for c, _ in columns], rows))


def eval_results(evaluations: list[dict]) -> list:
    """The evaluations as ``huggingface_hub.EvalResult`` s (the card's ``model-index``), one per
    shown value, rounded as the table shows it; the dataset is its Hub id where the prepared
    dataset came from the Hub, else the prepared folder's name."""
    from huggingface_hub import EvalResult

    results = []
    for e in evaluations:
        columns = [("", e.get("values") or {})]
        if e.get("grammar"):
            columns.append(("most probable caption: ", e["grammar"]))
        data = e.get("data") or "galaxy images"
        for prefix, values in columns:
            for key, label in EVAL_ROWS:
                value = shown_value(key, values.get(key))
                if value is None:
                    continue
                results.append(EvalResult(
                    task_type="image-text-to-text", task_name="Galaxy morphology captions",
                    dataset_type=e.get("source") or data,
                    dataset_name=data,
                    dataset_config=e.get("hub_config"), dataset_split=e.get("split"),
                    metric_type="accuracy" if key in ATTRIBUTES else key,
                    metric_name=prefix + label, metric_value=value))
    return results


def _license_text(license: dict, given: bool) -> str:
    if not license:
        return ("## License\n\nNot known here: the base model's card names none (or is not on "
                "this machine) and none was given (`galaxy-llava export --license ID`). Set "
                "`license:` in this card's metadata before publishing.")
    name = license.get("license_name") or license.get("license")
    link = f" ({license['license_link']})" if license.get("license_link") else ""
    return (f"## License\n\n`{name}`{link}, " + ("as given when it was saved." if given else
            "the base model's license (from its card).") + " See also the data's license "
            "under Limitations.")


def _family_notes(family: str) -> str:
    notes = next((f.card_notes for f in FAMILIES.values() if f.name == family), ())
    return "".join(f"\n\n{text}\n\n```python\n{code}\n```" for text, code in notes)


def render_card(folder: str | os.PathLike, kind: str, name: str | None = None) -> str:
    """The ``README.md`` text of a weights folder (``kind`` "adapter" or "model"), from its
    ``galaxy_llava.json`` and ``generation_config.json``; the license is the marker's
    ``license`` (given when saved) or the base model's (:func:`base_license`)."""
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    marker = read_marker(folder)
    training = marker.get("training") or None
    base, family = marker.get("base_model"), marker.get("family") or "vision-language"
    base_id = hub_id(base)
    data_id = ((training or {}).get("data") or {}).get("source")
    method = (training or {}).get("method") or marker.get("method")
    tags = list(TAGS) + [family] + (["lora"] if kind == "adapter" or method in ("lora", "qlora")
                                    else []) + (["peft"] if kind == "adapter" else [])
    name = name or marker.get("name") or folder.name
    license = {"license": marker["license"]} if marker.get("license") else base_license(base)
    evaluations = marker.get("evaluations") or []
    card_data = ModelCardData(
        base_model=base_id, library_name="peft" if kind == "adapter" else "transformers",
        pipeline_tag="image-text-to-text", tags=list(dict.fromkeys(tags)),
        datasets=[data_id] if data_id else None, **license,
        model_name=name if evaluations else None, eval_results=eval_results(evaluations) or None)
    if base_id:
        card_data.base_model_relation = "adapter" if kind == "adapter" else "finetune"
    base_text = (f"[{base_id}](https://huggingface.co/{base_id})" if base_id
                 else f"a local model folder (`{Path(base).name}`)" if base else "a base model")
    what = "A LoRA adapter for" if kind == "adapter" else "A fine-tune of"
    prompt, question = marker.get("prompt") or "", marker.get("question") or ""
    generation = read_json_object(folder / "generation_config.json")
    decoding = ", ".join(f"{k} {generation[k]}" for k in ("num_beams", "max_new_tokens",
                                                          "do_sample", "no_repeat_ngram_size",
                                                          "repetition_penalty")
                         if k in generation)
    snippet = usage_snippet(kind, question, base=base_id or (f"path/to/{Path(base).name}"
                                                             if base else None))
    # peft (and transformers' adapter loading) take the decoding from the base model: say so
    # first, since a plain load gives other captions than describe.
    warning = ("""
> **Decoding: load as in [Usage](#usage).** `PeftModel.from_pretrained` (and transformers'
> adapter loading) take the generation config from the base model, not from this folder's
> `generation_config.json`, so a plain `generate` decodes otherwise than
> `galaxy-llava describe` and gives other captions. Copy it to the base model first:
> `base.generation_config = GenerationConfig.from_pretrained(ADAPTER)`.
""" if kind == "adapter" else "")
    notes = _family_notes(family)
    body = f"""# {name}
{warning}
{what} {base_text} ({family} family) that describes a galaxy image in the words of the Galaxy
Zoo 2 volunteers' consensus: its type (elliptical or spiral), shape, bar, number of arms,
bulge and signs of a merger, in one sentence of a fixed caption grammar. Made with
galaxy-llava {__version__}; `galaxy-llava describe --model FOLDER IMAGES` runs it.

## Prompt

Ask with the question `{json.dumps(question)}` and one image. The processor's chat template turns
that into the exact prompt the model was trained on, token for token:

```text
{prompt}
```

## Usage

```python
{snippet}
```

`generation_config.json` holds `galaxy-llava describe`'s decoding ({decoding}; it stops at the
end-of-turn token), so a plain `model.generate(**inputs)` gives the same caption as
`describe`, computed in the same precision (`describe` uses fp32 on a CPU, bf16 on a GPU).{notes}

{_training_section(training)}

{_evaluation_section(evaluations)}

{_license_text(license, bool(marker.get("license")))}

## Limitations

The model only knows the caption grammar it was trained on, and its captions are as good as the
volunteers' votes behind them (a question few volunteers reached rests on few votes). Galaxy
Zoo 2 images are SDSS colour cutouts; other surveys' images may need fine-tuning anew. The
Galaxy Zoo 2 catalogue (`mwalmsley/gz2`) is licensed cc-by-nc-sa-4.0.
"""
    return str(ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}"))


def write_card(folder: str | os.PathLike, kind: str, name: str | None = None) -> Path:
    """Write (atomically) ``folder/README.md`` from :func:`render_card`; returns its path."""
    return write_text(Path(folder) / CARD, render_card(folder, kind, name))


def update_card(run: str | os.PathLike, metrics: dict | str | os.PathLike) -> Path:
    """Add one evaluation (an EVAL folder, its ``metrics.json`` or ``evaluate``'s dict) to the
    card of a RUN folder (its ``model/`` or ``adapter/``) or of an exported model folder: kept
    in ``galaxy_llava.json`` ``evaluations`` (one per name, split and dataset, the newest) and
    rendered as the card's evaluation table and ``model-index``. Only folders that train or
    export wrote (:func:`owns_card`). Returns the card's path."""
    run = Path(run)
    kind = run_kind(run) if run.is_dir() else None
    if kind is None:
        raise UserError(f"{run} is not a galaxy-llava run or model folder")
    folder = {"adapter": run / "adapter", "full": run / "model", "model": run}[kind]
    if not owns_card(folder):
        raise UserError(f"{folder} was not saved by galaxy-llava train or export: its model "
                        "card is not ours to edit")
    summary = evaluation_summary(metrics)
    same = ("name", "split", "data")
    kept = [e for e in read_marker(folder).get("evaluations") or []
            if isinstance(e, dict) and any(e.get(k) != summary.get(k) for k in same)]
    write_marker(folder, evaluations=kept + [summary])
    return write_card(folder, "adapter" if kind == "adapter" else "model")
