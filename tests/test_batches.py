"""training.batches: the dataset items (pixels or cached features, drawn captions per epoch) and
the collator's padding, attention mask and label mask. (Encoding one example: test_encoding.py.)"""

from __future__ import annotations

import pytest
import torch

from galaxy_llava.config import DEFAULT_PROMPT
from galaxy_llava.errors import UserError
from galaxy_llava.models.encoding import IGNORE_INDEX, encode_example
from galaxy_llava.training.batches import CaptionDataset, Collator
from galaxy_llava.training.feature_cache import FeatureStore
from test_encoding import CAPTIONS, LONGEST, SHORTEST, _answer, _image

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def processor(tiny_processor):
    return tiny_processor


def _constant_store(n: int = 8, extras: list[dict] | None = None) -> FeatureStore:
    """A feature store whose row ``i`` is a constant [1, tokens, width] block of ``i``."""
    data = torch.stack([torch.full((1, 16, 64), float(i)) for i in range(n)])
    return FeatureStore(data, torch.float32, extras)


def test_caption_dataset_items(processor, family, tmp_path):
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"{i}.png"))
        _image(i).save(paths[-1])
    records = [{"image": paths[0], "text": SHORTEST}, {"image": paths[1], "text": LONGEST}]
    data = CaptionDataset(records, processor, family, DEFAULT_PROMPT)
    assert len(data) == 2
    for i, r in enumerate(records):
        want = encode_example(processor, family, r["image"], r["text"])
        got = data[i]
        assert set(got) == set(want)
        assert torch.equal(got["input_ids"], want["input_ids"])
        assert torch.equal(got["labels"], want["labels"])
        assert got["pixel_values"].shape[0] == 1  # a leading image dim
        assert torch.allclose(got["pixel_values"], want["pixel_values"])
    store = _constant_store()
    cached = CaptionDataset(records, processor, family, DEFAULT_PROMPT, features=store,
                            rows={paths[0]: 7, paths[1]: 3})
    assert set(cached[1]) == {"input_ids", "labels", "pixel_values"}
    assert cached[1]["pixel_values"].shape == (1, 16, 64)
    assert torch.equal(cached[1]["pixel_values"], torch.full((1, 16, 64), 3.0))
    assert torch.equal(cached[0]["pixel_values"], store.row(7))
    assert torch.equal(cached[0]["input_ids"], data[0]["input_ids"])
    assert torch.equal(cached[0]["labels"], data[0]["labels"])
    # The prompt is a string: another prompt gives other prompt ids, the same answer.
    other = CaptionDataset(records, processor, family, "USER: <image>\nWhat galaxy?\nASSISTANT:")
    assert _answer(other[0]).tolist() == _answer(data[0]).tolist()
    assert other[0]["input_ids"].tolist() != data[0]["input_ids"].tolist()
    with pytest.raises(UserError, match="empty caption"):
        CaptionDataset([{"image": paths[0], "text": "  "}], processor, family, DEFAULT_PROMPT)


def test_cached_items_carry_the_stores_extra_inputs(processor, family, tmp_path):
    path = str(tmp_path / "0.png")
    _image(0).save(path)
    grid = torch.tensor([[1, 4, 4]])
    store = _constant_store(2, extras=[{"image_grid_thw": grid}, {"image_grid_thw": grid + 1}])
    item = CaptionDataset([{"image": path, "text": SHORTEST}], processor, family, DEFAULT_PROMPT,
                          features=store, rows={path: 1})[0]
    assert set(item) == {"input_ids", "labels", "pixel_values", "image_grid_thw"}
    assert torch.equal(item["image_grid_thw"], grid + 1)
    assert torch.equal(item["pixel_values"], store.row(1))


class _Draw:
    """A caption drawer over ``CAPTIONS``: a pure function of (epoch, index), every call recorded."""

    def __init__(self):
        self.calls: list[tuple[int, int]] = []

    def __call__(self, epoch: int, index: int) -> str:
        self.calls.append((epoch, index))
        return CAPTIONS[(3 * epoch + index) % len(CAPTIONS)]


class _AnswerCounter:
    """The tiny model's family, with every ``answer_ids`` call's caption recorded."""

    def __init__(self, family):
        self.family, self.captions = family, []

    def __getattr__(self, name):
        return getattr(self.family, name)

    def answer_ids(self, tok, caption):
        self.captions.append(caption)
        return self.family.answer_ids(tok, caption)


def test_drawn_captions_follow_the_epoch_and_are_tokenised_once_each(processor, family,
                                                                     tmp_path):
    """Vote targets: each item's caption comes from the drawer for the epoch set; the record's
    text is not used; each distinct caption is tokenised once; cached features as before."""
    path = str(tmp_path / "0.png")
    _image(0).save(path)
    records = [{"image": path, "text": "not a caption the drawer gives"}] * 2
    counting, draw, store = _AnswerCounter(family), _Draw(), _constant_store()
    data = CaptionDataset(records, processor, counting, DEFAULT_PROMPT, features=store,
                          rows={path: 5}, draw=draw)
    assert counting.captions == []  # nothing is tokenised up front
    seen = []
    for epoch in (0, 1, 2, 0, 1):
        data.set_epoch(epoch)
        assert data.epoch == epoch
        for i in range(2):
            item = data[i]
            want = encode_example(processor, family, path, draw(epoch, i))
            assert torch.equal(item["labels"], want["labels"])
            assert torch.equal(item["pixel_values"], store.row(5))
            seen.append(draw(epoch, i))
    assert sorted(counting.captions) == sorted(set(seen))  # once per distinct caption
    assert len(set(seen)) == len(CAPTIONS)


def test_dataloader_workers_see_the_epoch_set_after_they_started(processor, family, tmp_path):
    """The epoch lives in shared memory: persistent workers, started in epoch 0, draw epoch 1's
    captions once it is set."""
    path = str(tmp_path / "0.png")
    _image(0).save(path)
    data = CaptionDataset([{"image": path, "text": SHORTEST}] * 2, processor, family,
                          DEFAULT_PROMPT, features=_constant_store(), rows={path: 0},
                          draw=_Draw())
    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=1,
                                         persistent_workers=True)
    tok = processor.tokenizer
    for epoch in (0, 1):
        data.set_epoch(epoch)
        got = [tok.decode(_answer(item)[:-1]) for item in loader]
        assert got == [_Draw()(epoch, i) for i in range(2)]


def _expected_label_mask(labels: torch.Tensor) -> torch.Tensor:
    """True exactly where the next position holds a label (position by position)."""
    b, n = labels.shape
    return torch.tensor([[j + 1 < n and int(labels[i, j + 1]) != IGNORE_INDEX
                          for j in range(n)] for i in range(b)])


def test_collator_pads_ids_labels_and_masks(processor, family):
    pad = processor.tokenizer.pad_token_id
    short = encode_example(processor, family, _image(1), SHORTEST)
    long = encode_example(processor, family, _image(2), LONGEST)
    batch = Collator(pad)([short, long])
    n, m = len(short["input_ids"]), len(long["input_ids"])
    assert set(batch) == {"input_ids", "attention_mask", "labels", "label_mask", "pixel_values"}
    for key in ("input_ids", "labels", "attention_mask", "label_mask"):
        assert batch[key].shape == (2, m)
    assert batch["pixel_values"].shape == (2, 3, 64, 64)  # concatenated, not stacked
    assert torch.equal(batch["pixel_values"], torch.cat([short["pixel_values"],
                                                         long["pixel_values"]]))
    assert (batch["input_ids"][0, n:] == pad).all()
    # padding is not trained on (DESIGN.md, defect 2)
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()
    assert (batch["attention_mask"][0, n:] == 0).all()
    assert (batch["attention_mask"][0, :n] == 1).all() and (batch["attention_mask"][1] == 1).all()
    assert torch.equal(batch["labels"][0, :n], short["labels"])
    assert torch.equal(batch["input_ids"][1], long["input_ids"])
    # label_mask: True exactly at positions whose next label is not -100 (where lm_head is needed)
    mask = batch["label_mask"]
    assert mask.dtype == torch.bool
    assert torch.equal(mask, _expected_label_mask(batch["labels"]))
    assert int(mask.sum()) == int((batch["labels"] != IGNORE_INDEX).sum())
    assert not mask[:, -1].any()
    assert mask[0, n - 2] and not mask[0, n - 1]  # the last real position predicts nothing
    left = Collator(pad, padding_side="left")([short, long])
    assert (left["input_ids"][0, : m - n] == pad).all()
    assert (left["attention_mask"][0, : m - n] == 0).all()
    assert (left["attention_mask"][0, m - n:] == 1).all()
    assert torch.equal(left["labels"][0, m - n:], short["labels"])
    assert torch.equal(left["label_mask"], _expected_label_mask(left["labels"]))
    assert torch.equal(left["label_mask"][0, m - n:], batch["label_mask"][0, :n])


def test_collator_without_labels_and_bad_settings(processor, family):
    pad = processor.tokenizer.pad_token_id
    ex = encode_example(processor, family, _image(), SHORTEST)
    batch = Collator(pad)([{"input_ids": ex["input_ids"], "pixel_values": ex["pixel_values"]}])
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values"}
    assert batch["pixel_values"].shape == (1, 3, 64, 64)
    with pytest.raises(UserError, match="no pad token"):
        Collator(None)
    with pytest.raises(ValueError, match="padding_side"):
        Collator(pad, padding_side="middle")


class _TokenInputsFamily:
    """A family with per-token inputs: ``position_ids`` from the padded ids, offset by the
    processor it is handed (to see which one the collator passes)."""

    def token_inputs(self, input_ids, processor) -> dict:
        return {"position_ids": torch.arange(input_ids.shape[1]).expand_as(input_ids) + processor}


def test_collator_concatenates_variable_image_inputs_and_adds_token_inputs(processor, family):
    pad = processor.tokenizer.pad_token_id
    ex = encode_example(processor, family, _image(), SHORTEST)
    # Qwen-style inputs: a variable number of patch rows per image, a grid row per image.
    a = {"input_ids": ex["input_ids"], "labels": ex["labels"],
         "pixel_values": torch.ones(4, 8), "image_grid_thw": torch.tensor([[1, 2, 2]])}
    b = {"input_ids": ex["input_ids"][:-3], "labels": ex["labels"][:-3],
         "pixel_values": torch.zeros(6, 8), "image_grid_thw": torch.tensor([[1, 2, 3]])}
    batch = Collator(pad, family=_TokenInputsFamily(), processor=100)([a, b])
    assert set(batch) == {"input_ids", "attention_mask", "labels", "label_mask", "pixel_values",
                          "image_grid_thw", "position_ids"}
    assert torch.equal(batch["pixel_values"], torch.cat([a["pixel_values"], b["pixel_values"]]))
    assert torch.equal(batch["image_grid_thw"], torch.tensor([[1, 2, 2], [1, 2, 3]]))
    n = len(ex["input_ids"])
    assert torch.equal(batch["position_ids"], torch.arange(n).expand(2, n) + 100)
    # LLaVA has no per-token inputs: with or without the family, the same batch.
    plain = Collator(pad)([ex, ex])
    with_family = Collator(pad, family=family, processor=processor)([ex, ex])
    assert set(with_family) == set(plain)
    assert all(torch.equal(with_family[k], plain[k]) for k in plain)
    assert family.token_inputs(plain["input_ids"], processor) == {}


def test_collated_batch_trains_and_label_mask_covers_the_loss(tiny_model_dir, processor, family):
    from galaxy_llava.models.loading import load_model

    model, _ = load_model(tiny_model_dir)
    batch = Collator(processor.tokenizer.pad_token_id)(
        [encode_example(processor, family, _image(i), c) for i, c in enumerate(CAPTIONS)])
    mask = batch.pop("label_mask")
    out = model(**batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    # HF's shifted loss uses exactly the logits at label_mask positions, against the next label.
    next_labels = torch.roll(batch["labels"], -1, dims=1)[mask]
    masked = torch.nn.functional.cross_entropy(out.logits[mask].float(), next_labels)
    assert torch.allclose(masked, out.loss, atol=1e-5)
