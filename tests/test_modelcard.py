"""modelcard: the README.md of model, adapter and export folders (Hub metadata, prompt, decoding,
training settings, evaluation table, usage snippet), and update_card adding an evaluation."""

from __future__ import annotations

import json
import shutil

import pytest

from galaxy_llava.errors import UserError
from galaxy_llava.modelcard import (EVAL_ROWS, TRAINING_ROWS, data_summary, hub_id, render_card,
                                    update_card, usage_snippet, write_card)
from galaxy_llava.models.folders import read_marker, write_marker

pytestmark = pytest.mark.usefixtures("one_thread")


def _card(folder):
    from huggingface_hub import ModelCard

    return ModelCard.load(folder / "README.md")


def _metrics(name="eval-test", split="test", type_acc=0.875, grammar=False):
    """A metrics.json as evaluate writes it (only the keys a card reads)."""
    m = {"name": name, "kind": "vlm", "split": split, "data": "/somewhere/data", "n": 8,
         "exact_match": 0.5, "parse_rate": 1.0, "hallucination_rate": 0.125,
         "omission_rate": 0.25, "mean_length": 11.5,
         "attributes": {"type": {"accuracy": type_acc}, "bar": {"accuracy": None}},
         "complete": True}
    if grammar:
        m["grammar"] = {**m, "exact_match": 0.625, "attributes": {"type": {"accuracy": 1.0}}}
        del m["grammar"]["complete"]
    return m


@pytest.fixture
def model_folder(tmp_path, tiny_model_dir):
    """A model folder whose marker names a local base model and holds LoRA training settings."""
    folder = tmp_path / "weights"
    folder.mkdir()
    write_marker(folder, kind="model", prompt="USER: <image>\nDescribe this galaxy.\nASSISTANT:",
                 question="Describe this galaxy.", family="llava", base_model=str(tiny_model_dir),
                 training={"method": "lora", "learning_rate": 5e-05, "num_train_epochs": 3,
                           "per_device_train_batch_size": 8, "lora_r": 16, "lora_alpha": 32,
                           "seed": 42, "data": {"name": "gz2-600", "rules": "reference",
                                                "source": "mwalmsley/gz2", "galaxies": 274,
                                                "classes": {"elliptical": 137, "spiral": 137}}})
    (folder / "generation_config.json").write_text(json.dumps({"num_beams": 3,
                                                               "max_new_tokens": 40}))
    return folder


def test_hub_ids_never_publish_a_local_path(tmp_path):
    assert hub_id("bczhou/tiny-llava-v1-hf") == "bczhou/tiny-llava-v1-hf"
    assert hub_id(str(tmp_path)) is None  # an existing folder
    assert hub_id("/no/such/folder") is None and hub_id(None) is None
    cached = tmp_path / "hub" / "models--bczhou--tiny-llava-v1-hf" / "snapshots" / "abc123"
    assert hub_id(str(cached)) == "bczhou/tiny-llava-v1-hf"
    data = tmp_path / "datasets--mwalmsley--gz2" / "snapshots" / "x"
    assert hub_id(str(data), "datasets") == "mwalmsley/gz2" and hub_id(str(data)) is None


def test_card_metadata_and_sections(model_folder, tmp_path):
    write_card(model_folder, "adapter")
    text = (model_folder / "README.md").read_text()
    meta = _card(model_folder).data.to_dict()
    assert "base_model" not in meta  # the base is a local folder: no path of this machine
    assert str(tmp_path) not in text and "More Information Needed" not in text
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "image-text-to-text"
    assert {"galaxy-zoo", "astronomy", "llava", "lora", "peft"} <= set(meta["tags"])
    assert meta["datasets"] == ["mwalmsley/gz2"]
    assert "USER: <image>\nDescribe this galaxy.\nASSISTANT:" in text  # the prompt as trained
    assert usage_snippet("adapter", "Describe this galaxy.", base="path/to/tiny") in text
    for label, value in (("learning rate", "5e-05"), ("LoRA rank r", "16"), ("LoRA alpha", "32"),
                         ("epochs", "3"), ("batch size per device", "8")):
        assert f"| {label} | {value} |" in text
    assert "num_beams 3, max_new_tokens 40" in text
    assert "Not evaluated yet" in text

    write_marker(model_folder, base_model="org/base-model")
    write_card(model_folder, "model")
    meta = _card(model_folder).data.to_dict()
    assert meta["base_model"] == "org/base-model" and meta["library_name"] == "transformers"
    assert meta["base_model_relation"] == "finetune"
    assert 'BASE = ' not in (model_folder / "README.md").read_text()  # the transformers snippet


def test_card_without_training_settings(model_folder):
    marker = read_marker(model_folder)
    del marker["training"]
    (model_folder / "galaxy_llava.json").write_text(json.dumps(marker))
    text = render_card(model_folder, "model")
    assert "no training settings were recorded" in text and "| learning rate |" not in text


@pytest.mark.parametrize("kind", ["model", "adapter"])
def test_usage_snippets_are_python(kind):
    code = usage_snippet(kind, 'Is it "round"?\nSay.', base="org/base")
    compile(code, "snippet", "exec")
    assert 'Is it \\"round\\"?\\nSay.' in code and ("PeftModel" in code) == (kind == "adapter")


def test_update_card_adds_replaces_and_keeps_evaluations(model_folder, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.move(model_folder, run / "model")
    (run / "model" / "config.json").write_text("{}")  # what makes it a full run's model/
    update_card(run, _metrics(type_acc=0.875))
    text = (run / "model" / "README.md").read_text()
    assert "| type accuracy | 87.5% |" in text
    assert "| exact match (all 7 attributes) | 50.0% |" in text
    assert "| bar accuracy | - |" in text and "| mean length (words) | 11.5 |" in text
    assert "eval-test (test, n=8)" in text and "Not evaluated yet" not in text
    assert "/somewhere" not in text  # only the dataset's folder name

    update_card(run, _metrics(type_acc=0.75))  # the same evaluation again: replaced
    update_card(run, _metrics(name="eval-val", split="val", grammar=True))  # another: added
    text = (run / "model" / "README.md").read_text()
    # the first evaluation's new value, the second's, and its most probable captions'
    assert "| type accuracy | 75.0% | 87.5% | 100.0% |" in text
    assert len(read_marker(run / "model")["evaluations"]) == 2
    assert read_marker(run / "model")["training"]["lora_r"] == 16  # the rest kept

    eval_dir = tmp_path / "EVAL"
    eval_dir.mkdir()
    (eval_dir / "metrics.json").write_text(json.dumps(_metrics(name="from-folder")))
    update_card(run, eval_dir)
    assert "from-folder (test, n=8)" in (run / "model" / "README.md").read_text()


def test_update_card_refuses_what_it_cannot_use(tmp_path, model_folder):
    with pytest.raises(UserError, match="is not a galaxy-llava run or model folder"):
        update_card(tmp_path / "nothing", _metrics())
    (model_folder / "config.json").write_text("{}")
    unfinished = tmp_path / "EVAL"
    unfinished.mkdir()
    (unfinished / "metrics.json").write_text(json.dumps({**_metrics(), "complete": False}))
    with pytest.raises(UserError, match="not a finished evaluation"):
        update_card(model_folder, unfinished)
    with pytest.raises(UserError, match="is not an evaluation's metrics.json"):
        update_card(model_folder, tmp_path / "missing")


def test_data_summary_reads_the_manifest(prepared_dir, tmp_path):
    stats = json.loads((prepared_dir / "stats.json").read_text())
    s = data_summary(prepared_dir)
    assert (s["name"], s["rules"], s["image_size"]) == ("data", "reference", 64)
    assert s["galaxies"] == stats["n_records"] == 24  # what the dataset holds
    assert s["classes"] == {"elliptical": 12, "spiral": 12}
    assert s["source"] is None  # a local synthetic catalogue
    assert data_summary(tmp_path) == {"name": tmp_path.name, "rules": None, "galaxies": None,
                                      "classes": {}, "image_size": None, "source": None,
                                      "hub_config": None}
    assert data_summary(prepared_dir / "dataset.jsonl") == s  # the JSONL names its folder


def test_cards_carry_the_shared_tags(model_folder):
    from galaxy_llava.config import TAGS
    from galaxy_llava.hub_dataset import dataset_card

    write_card(model_folder, "model")
    model_tags = _card(model_folder).data.to_dict()["tags"]
    dataset_tags = dataset_card({"train": 1}, {}).split("\ntags:\n", 1)[1].split("\n")
    assert model_tags[:len(TAGS)] == list(TAGS)
    assert [t[2:] for t in dataset_tags[:len(TAGS)]] == list(TAGS)  # "- tag" lines


def test_every_row_label_is_unique():
    for rows in (TRAINING_ROWS, EVAL_ROWS):
        assert len({label for _, label in rows}) == len(rows)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_trained_run_card_then_evaluation_then_export(tiny_model_dir, prepared_dir, tmp_path):
    """The trainer's card holds the run's settings; an evaluation's metrics.json updates it;
    the export's card carries both."""
    from galaxy_llava.generate import describe_paths
    from galaxy_llava.metrics import score_captions
    from galaxy_llava.saving import export_run
    from galaxy_llava.morphology import Morphology
    from galaxy_llava.records import load_records
    from galaxy_llava.training.trainer import train

    run = tmp_path / "run"
    train(str(tiny_model_dir), prepared_dir, "lora", run, max_steps=2, learning_rate=3e-3,
          per_device_train_batch_size=4, lora_r=4, lora_alpha=8, logging_steps=1)
    text = (run / "adapter" / "README.md").read_text()
    n_train = len(load_records(prepared_dir, split="train"))
    for label, value in (("method", "lora"), ("learning rate", "0.003"), ("LoRA rank r", "4"),
                         ("LoRA alpha", "8"), ("optimizer steps", "2"),
                         ("batch size per device", "4"), ("training galaxies", str(n_train))):
        assert f"| {label} | {value} |" in text, label
    assert "More Information Needed" not in text and str(tmp_path) not in text
    assert "the prepared dataset `data`" in text

    # metrics.json as evaluate writes it: compute_metrics of the run's answers on the test split
    test = load_records(prepared_dir, split="test")
    texts = [r["caption"]
             for r in describe_paths(run, [r["image"] for r in test], max_new_tokens=8)]
    metrics = {"name": "EVAL", "split": "test", "data": str(prepared_dir),
               **score_captions([Morphology.from_dict(r["morphology"]) for r in test], texts),
               "complete": True}
    (tmp_path / "EVAL").mkdir()
    (tmp_path / "EVAL" / "metrics.json").write_text(json.dumps(metrics))
    update_card(run, tmp_path / "EVAL")
    accuracy = metrics["attributes"]["type"]["accuracy"]
    row = f"| type accuracy | {100 * accuracy:.1f}% |"
    assert row in (run / "adapter" / "README.md").read_text()
    out = export_run(run, tmp_path / "export")
    text = (out / "README.md").read_text()
    assert row in text and "| LoRA rank r | 4 |" in text
    meta = _card(out).data.to_dict()
    assert meta["library_name"] == "transformers" and "lora" in meta["tags"]


# ------------------------------------------------------------ what a Hub user recognises

def test_license_from_the_base_card_from_the_flag_or_said_unknown(model_folder, tmp_path):
    from galaxy_llava.modelcard import base_license

    base = tmp_path / "base"
    base.mkdir()
    write_marker(model_folder, base_model=str(base))
    write_card(model_folder, "model")
    assert "license" not in _card(model_folder).data.to_dict()  # unknown: omitted, and said
    assert "## License\n\nNot known here" in (model_folder / "README.md").read_text()

    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n\n# base\n")
    assert base_license(base) == {"license": "apache-2.0"}
    write_card(model_folder, "model")
    assert _card(model_folder).data.to_dict()["license"] == "apache-2.0"
    assert "the base model's license" in (model_folder / "README.md").read_text()

    write_marker(model_folder, license="mit")  # given when saved (export --license): it wins
    write_card(model_folder, "model")
    assert _card(model_folder).data.to_dict()["license"] == "mit"
    assert base_license(tmp_path / "nothing") == {} and base_license(None) == {}


def test_evaluations_are_model_index_results_as_the_table_rounds_them(model_folder, tmp_path):
    from huggingface_hub import ModelCard

    run = tmp_path / "run"
    run.mkdir()
    shutil.move(model_folder, run / "model")
    (run / "model" / "config.json").write_text("{}")
    metrics = {**_metrics(type_acc=0.87654), "mean_length": 11.4583}
    update_card(run, metrics)
    card = ModelCard.load(run / "model" / "README.md")
    meta = card.data.to_dict()
    assert meta["datasets"] == ["mwalmsley/gz2"] and meta["model-index"][0]["name"] == "model"
    results = {r.metric_name: r for r in card.data.eval_results}
    assert results["type accuracy"].metric_value == 87.7
    assert results["type accuracy"].metric_type == "accuracy"
    assert results["mean length (words)"].metric_value == 11.5
    assert "bar accuracy" not in results  # no value: no result
    assert {r.dataset_split for r in results.values()} == {"test"}
    text = card.text
    assert "| type accuracy | 87.7% |" in text and "| mean length (words) | 11.5 |" in text
    assert "11.4583" not in text and "87.654" not in text


def test_card_says_the_galaxies_used_not_the_ones_asked_for(model_folder):
    write_card(model_folder, "model")
    text = (model_folder / "README.md").read_text()
    assert "(274 galaxies: 137 elliptical, 137 spiral; captions under the `reference` rules)" \
        in text
    assert "per class" not in text


def test_adapter_card_says_first_that_plain_peft_ignores_its_decoding(model_folder):
    write_card(model_folder, "adapter")
    body = _card(model_folder).text.strip().splitlines()
    assert body[0].startswith("# ")
    first = " ".join(body[1:8])
    assert "generation_config.json" in first and "PeftModel.from_pretrained" in first
    write_card(model_folder, "model")
    assert "PeftModel.from_pretrained" not in _card(model_folder).text


def test_update_card_leaves_folders_it_did_not_write(tiny_model_dir, tmp_path):
    """A base model (here a tiny one, which has a marker) is not a folder train or export
    wrote: its card is not ours to edit, and evaluate leaves it alone."""
    from galaxy_llava.evaluate import _add_to_card
    from galaxy_llava.modelcard import owns_card

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    before = sorted(p.name for p in base.iterdir())
    assert not owns_card(base)
    with pytest.raises(UserError, match="not saved by galaxy-llava train or export"):
        update_card(base, _metrics())
    _add_to_card(base, _metrics())
    assert sorted(p.name for p in base.iterdir()) == before


def test_qwen2_vl_card_shows_how_to_load_without_torchvision(tmp_path):
    """The Qwen2-VL card's note (no torchvision: tokenizer and image processor) builds exactly
    the inputs of galaxy-llava's processor, and the card shows it."""
    import torch

    from galaxy_llava.models.qwen2_vl import WITHOUT_TORCHVISION
    from galaxy_llava.models.registry import family_for
    from galaxy_llava.saving import save_run_model
    from galaxy_llava.toy.tiny import build_family_in_memory

    model, processor = build_family_in_memory("qwen2_vl")
    family = family_for(model)
    folder = save_run_model(model, processor, tmp_path / "run",
                            prompt=family.default_prompt(processor))
    text, code = WITHOUT_TORCHVISION
    assert text in (folder / "README.md").read_text() and code in (folder / "README.md").read_text()
    import numpy as np
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8))
    question = read_marker(folder)["question"]
    space = {"MODEL": str(folder), "image": image, "messages": [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": question}]}]}
    exec(code, space)
    saved = family.load_processor(str(folder))
    prompt = saved.apply_chat_template(space["messages"], add_generation_prompt=True,
                                       tokenize=False)
    want = saved(text=prompt, images=[image], return_tensors="pt")
    got = space["inputs"]
    for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw",
                "mm_token_type_ids"):
        assert torch.equal(got[key], want[key]), key
