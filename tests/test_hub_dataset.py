"""hub_dataset: a prepared dataset's Hugging Face layout. ``datasets.load_dataset(FOLDER)`` gives
the splits with decodable images, the caption, morphology, fractions and TRL's messages/images;
galaxy-llava's own loaders ignore it."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
from PIL import Image

from galaxy_llava import hub_dataset
from galaxy_llava.config import DEFAULT_QUESTION as QUESTION
from galaxy_llava.hub_dataset import dataset_card, messages
from galaxy_llava.records import SPLITS


def _load(folder, cache):
    import datasets

    return datasets.load_dataset(str(folder), cache_dir=str(cache))


def _records(folder):
    return [json.loads(line) for line in (folder / "dataset.jsonl").read_text().splitlines()]


def test_load_dataset_gives_the_splits_images_and_columns(prepared_dir, tmp_path):
    ds = _load(prepared_dir, tmp_path / "cache")
    records = _records(prepared_dir)
    assert set(ds) == {"train", "validation", "test"}
    for name in SPLITS:  # the prepared records' split names are Hugging Face's
        mine = [r for r in records if r["split"] == name]
        split = ds[name]
        assert len(split) == len(mine) > 0
        assert split["id_str"] == [r["id_str"] for r in mine]  # the same galaxies, same order
        for row, rec in zip(split, mine):
            with Image.open(prepared_dir / rec["image"]) as jpeg:
                pixels = np.asarray(jpeg.convert("RGB"))
            assert np.array_equal(np.asarray(row["image"].convert("RGB")), pixels)
            assert len(row["images"]) == 1
            assert np.array_equal(np.asarray(row["images"][0].convert("RGB")), pixels)
            assert row["caption"] == rec["text"] and row["morphology"] == rec["morphology"]
            assert row["fractions"] == rec["fractions"]
            assert row["votes"] == rec["votes"] and rec["votes"]  # totals, as int64
            assert row["messages"] == messages(rec["text"])  # TRL's format, round-tripped
    assert ds["train"][0]["messages"][0]["content"][1] == {"type": "text", "text": QUESTION}


def test_our_loaders_ignore_the_hub_files(prepared_dir):
    from galaxy_llava.generate import expand_image_paths
    from galaxy_llava.records import load_records

    assert len(load_records(prepared_dir)) == len(_records(prepared_dir))
    found = expand_image_paths([prepared_dir])
    assert found and all(p.parent == prepared_dir / "images" for p in found)
    assert (prepared_dir / "README.md").is_file()
    assert list((prepared_dir / "data").glob("*.parquet"))


def test_the_card_names_the_splits(prepared_dir):
    from huggingface_hub import DatasetCard

    meta = DatasetCard.load(prepared_dir / "README.md").data.to_dict()
    files = meta["configs"][0]["data_files"]
    assert [f["split"] for f in files] == ["train", "validation", "test"]
    assert all(f["path"] == f"data/{f['split']}-*" for f in files)
    assert "image-text-to-text" in meta["task_categories"] and "galaxy-zoo" in meta["tags"]
    assert "source_datasets" not in meta  # a local synthetic catalogue
    text = (prepared_dir / "README.md").read_text()
    assert str(prepared_dir.parent) not in text  # no path of this machine


def test_hub_source_and_empty_split_in_the_card():
    card = dataset_card({"train": 9, "validation": 1, "test": 0},
                        {"source": "mwalmsley/gz2", "source_kind": "hub", "hub_config": "tiny",
                         "rules": "tree", "n_per_class": 5})
    assert "source_datasets:\n- mwalmsley/gz2" in card and "config `tiny`" in card
    assert "split: test" not in card and "split: validation" in card  # no shard, no split
    assert "| test | 0 |" in card


def test_the_card_is_a_function_of_the_settings_only():
    """Where the catalogue was read from on this machine, and which galaxy-llava wrote it,
    are not in the card: the same dataset gives the same README.md bytes anywhere."""
    settings = {"source_kind": "parquet", "rules": "reference", "n_per_class": 12, "seed": 0,
                "image_size": 64, "val_fraction": 0.2, "test_fraction": 0.2}
    counts = {"train": 16, "validation": 4, "test": 4}
    here = dataset_card(counts, {**settings, "source": "/home/me/gz2", "version": "0.1"})
    there = dataset_card(counts, {**settings, "source": "/tmp/copy/gz2", "version": "0.2"})
    assert here == there and "/home/me" not in here
    assert dataset_card(counts, {**settings, "seed": 1}) != here  # the settings are in it


def test_shards_split_large_splits_and_stale_shards_go(prepared_dir, tmp_path, monkeypatch):
    import shutil

    from galaxy_llava.prepare import _write_if_changed

    folder = tmp_path / "copy"
    shutil.copytree(prepared_dir, folder)
    records = _records(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    one_image = (folder / records[0]["image"]).stat().st_size
    monkeypatch.setattr(hub_dataset, "MAX_SHARD_BYTES", 5 * one_image)  # ~2 images a shard
    written = hub_dataset.write_hub_layout(folder, records, manifest, _write_if_changed)
    assert len([w for w in written if w.startswith("data/train-")]) > 2
    assert sorted(p.name for p in (folder / "data").iterdir()) == sorted(
        w.split("/")[1] for w in written)  # the single-shard files are gone
    ds = _load(folder, tmp_path / "cache")
    assert ds["train"]["id_str"] == [r["id_str"] for r in records if r["split"] == "train"]


def test_only_one_shards_images_are_read_at_a_time(prepared_dir, tmp_path, monkeypatch):
    """Shards are planned from file sizes; a shard's images are read just before it is written,
    never a whole split's up front (a full GZ2 split is gigabytes)."""
    import shutil
    from pathlib import Path

    folder = tmp_path / "copy"
    shutil.copytree(prepared_dir, folder)
    records = _records(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    image_names = {Path(r["image"]).name for r in records}
    monkeypatch.setattr(hub_dataset, "MAX_SHARD_BYTES",
                        5 * (folder / records[0]["image"]).stat().st_size)
    reads, pending, shards = [], [], []  # every image read; those since the last shard written
    real_read = Path.read_bytes

    def counting_read(self):
        if self.name in image_names:
            reads.append(self.name)
            pending.append(self.name)
        return real_read(self)

    def write(path, data):
        if path.suffix == ".parquet":
            shards.append((path.name, list(pending)))
            pending.clear()
        path.write_bytes(data)
        return True

    monkeypatch.setattr(Path, "read_bytes", counting_read)
    written = hub_dataset.write_hub_layout(folder, records, manifest, write)
    monkeypatch.undo()
    train = [name for name, _ in shards if name.startswith("train-")]
    assert len(train) > 2 and len(written) == len(shards)  # several shards in one split
    assert sorted(reads) == sorted(image_names)  # each image read once
    assert not pending  # nothing read after the last shard
    import pyarrow.parquet as pq

    for name, read in shards:  # what was read before a shard is exactly that shard's images
        rows = pq.read_table(folder / "data" / name, columns=["image"]).to_pylist()
        assert read == [row["image"]["path"] for row in rows]


def test_shards_stay_under_the_limit():
    parts = hub_dataset._shards([10, 10, 10, 30, 5], limit=40)
    assert parts == [slice(0, 2), slice(2, 3), slice(3, 4), slice(4, 5)]
    assert hub_dataset._shards([], limit=40) == [slice(0, 0)]
    assert hub_dataset._shards([100], limit=40) == [slice(0, 1)]  # one image over: its own


def test_question_is_the_families_default():
    from galaxy_llava.models.registry import FAMILIES

    for family in FAMILIES.values():
        assert inspect.signature(family.default_prompt).parameters["question"].default == QUESTION


@pytest.mark.slow
def test_trl_sft_trainer_trains_on_the_prepared_dataset(prepared_dir, tiny_model_dir, tmp_path):
    """TRL reads our ``messages``/``images`` as its vision-language SFT data: ``load_dataset`` of
    a prepared folder and a model folder as galaxy-llava saves it (the chat template written
    beside the weights), loaded by plain ``from_pretrained``, through ``SFTTrainer`` with its own
    collator. Its assistant-only labels are exactly the caption's tokens and the end token that
    galaxy-llava's own encoding trains on, and two steps train."""
    import datasets
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from galaxy_llava.models.encoding import encode_example
    from galaxy_llava.models.loading import load_model
    from galaxy_llava.models.registry import family_for
    from galaxy_llava.saving import save_run_model

    model, processor = load_model(tiny_model_dir, device="cpu", dtype=torch.float32)
    folder = save_run_model(model, processor, tmp_path / "run", base_model=str(tiny_model_dir))
    family = family_for(model)
    train = datasets.load_dataset(str(prepared_dir), cache_dir=str(tmp_path / "cache"))["train"]
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(folder)
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2,
                     assistant_only_loss=True, use_cpu=True, report_to="none", logging_steps=1,
                     save_strategy="no")
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=processor)
    assert isinstance(trainer.data_collator, DataCollatorForVisionLanguageModeling)

    rows = [train[i] for i in range(2)]
    batch = trainer.data_collator([dict(r) for r in rows])
    for k, row in enumerate(rows):
        ours = encode_example(processor, family, row["image"], row["caption"])
        ids = batch["input_ids"][k][batch["attention_mask"][k] == 1]
        labels = batch["labels"][k][batch["labels"][k] != -100]
        caption = family.answer_ids(processor.tokenizer, row["caption"])
        assert labels.tolist() == caption + family.end_ids(processor.tokenizer)
        assert labels.tolist() == ours["labels"][ours["labels"] != -100].tolist()
        # The same sequence as galaxy-llava's own training, image tokens and all, but for the
        # BOS: TRL tokenizes with add_special_tokens=False and our template writes no BOS.
        assert ours["input_ids"][0] == processor.tokenizer.bos_token_id
        assert ids.tolist() == ours["input_ids"][1:].tolist()
        assert torch.equal(batch["pixel_values"][k], ours["pixel_values"][0])

    before = model.lm_head.weight.detach().clone()
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert result.global_step == 2 and len(losses) == 2
    assert all(np.isfinite(loss) and loss > 0 for loss in losses)
    assert not torch.equal(model.lm_head.weight, before)  # the steps changed the weights
