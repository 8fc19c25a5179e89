"""models.idefics3 (SmolVLM / SmolVLM2) on the tiny offline Idefics3: prompt ids equal the
processor's own (image splitting off and on, square and non-square images), exact labels, the
frozen encoder's features, the cached-features forward and generate, LoRA targets, reloading,
and a tiny SmolVLM2 (``model_type`` "smolvlm") with the image-only processor."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from galaxy_llava.errors import UserError
from galaxy_llava.models.encoding import IGNORE_INDEX, encode_example
from galaxy_llava.models.idefics3 import IDEFICS3, max_sub_images
from galaxy_llava.models.registry import family_for
from galaxy_llava.training.batches import Collator

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTION = "This is an image of a spiral galaxy, with two arms."
SIZES = [(64, 64), (100, 60), (60, 100), (200, 50), (50, 200), (130, 129)]


def _image(width: int = 64, height: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def _splitting(processor, longest_edge: int = 192):
    """A copy of ``processor`` that splits images into 64 px tiles (up to 3x3 + global)."""
    proc = copy.deepcopy(processor)
    proc.image_processor.do_image_splitting = True
    proc.image_processor.size = {"longest_edge": longest_edge}
    return proc


def _prompt_ids(processor, prompt, image):
    inputs = IDEFICS3.image_inputs(processor, image)
    return IDEFICS3.prompt_ids(processor, prompt, IDEFICS3.num_image_tokens(processor, inputs))


def _batch(processor, images, prompt=None, captions=None):
    prompt = prompt or IDEFICS3.default_prompt(processor)
    items = [encode_example(processor, IDEFICS3, im, c, prompt)
             for im, c in zip(images, captions or [CAPTION] * len(images), strict=True)]
    batch = Collator(processor.tokenizer.pad_token_id, family=IDEFICS3,
                     processor=processor)(items)
    batch.pop("label_mask")
    return batch


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from galaxy_llava.toy.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("idefics3") / "tiny", family="idefics3")


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    """``(model, processor)`` as load_model returns them (module-shared: do not change)."""
    from galaxy_llava.models.loading import load_model

    model, processor = load_model(tiny_dir, device="cpu", dtype=torch.float32)
    return model.eval(), processor


# ----------------------------------------------------------------- prompt and image tokens


def test_family_chat_prompt_and_end_token(tiny):
    model, processor = tiny
    assert family_for(model) is IDEFICS3
    assert type(model).__name__ == "Idefics3ForConditionalGeneration"
    prompt = IDEFICS3.default_prompt(processor)
    assert prompt == "<|im_start|>User:<image>Describe this galaxy.<end_of_utterance>\nAssistant:"
    tok = processor.tokenizer
    assert tok.convert_ids_to_tokens(IDEFICS3.end_ids(tok)) == ["<end_of_utterance>"]
    assert model.generation_config.eos_token_id == IDEFICS3.end_ids(tok)[0]
    assert model.config.text_config.pad_token_id == tok.pad_token_id
    # the answer follows "Assistant:" after a space, as SmolVLM writes it
    assert tok.decode(IDEFICS3.answer_ids(tok, "  " + CAPTION)) == " " + CAPTION
    with pytest.raises(UserError, match="exactly once"):
        IDEFICS3.prompt_ids(processor, "no image here", 19)


@pytest.mark.parametrize("split", [False, True])
def test_prompt_ids_equal_the_processors(tiny, split):
    model, processor = tiny
    proc = _splitting(processor) if split else processor
    prompt = IDEFICS3.default_prompt(proc)
    tok = proc.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    grids = set()
    for width, height in SIZES:
        image = _image(width, height, seed=width)
        inputs = IDEFICS3.image_inputs(proc, image)
        n = IDEFICS3.num_image_tokens(proc, inputs)
        ids = IDEFICS3.prompt_ids(proc, prompt, n)
        ref = proc(images=[image], text=[prompt], return_tensors="pt")
        assert ids == ref["input_ids"][0].tolist(), (width, height)
        # the count is the processor's: every token it writes for the image
        assert n == len(ids) - len(tok(prompt).input_ids) + 1
        sub_images = ref["pixel_values"].shape[1]
        assert ids.count(image_id) == 16 * sub_images
        # every image is padded to one shape: 1 sub-image unsplit, 3x3 + global split
        assert inputs["pixel_values"].shape == (1, max_sub_images(proc), 3, 64, 64)
        assert torch.equal(inputs["pixel_values"][:, :sub_images], ref["pixel_values"])
        assert not inputs["pixel_values"][:, sub_images:].any()
        assert torch.equal(inputs["pixel_attention_mask"].gt(0)[:, :sub_images],
                           ref["pixel_attention_mask"].bool())
        # whole tiles: the mask is one byte per sub-image, expanded (a view)
        assert inputs["pixel_attention_mask"].untyped_storage().nbytes() == max_sub_images(proc)
        grids.add(IDEFICS3._grid(inputs))
        # the model sees the same thing from the family's inputs as from the processor's
        with torch.no_grad():
            ours = model(input_ids=torch.tensor([ids]), **inputs).logits
            theirs = model(**ref).logits
        assert torch.equal(ours, theirs)
    if split:  # 1x3 and 3x1 (same sub-image count, one token apart) both seen and told apart
        assert {(3, 3), (2, 3), (3, 2), (1, 3), (3, 1)} <= grids
        assert len({len(_prompt_ids(proc, prompt, _image(w, h))) for w, h in SIZES[3:5]}) == 2
    else:
        assert grids == {(0, 0)} and max_sub_images(proc) == 1


def test_image_token_counts(tiny):
    _, processor = tiny
    unsplit = IDEFICS3.image_inputs(processor, _image(200, 50))
    assert IDEFICS3.num_image_tokens(processor, unsplit) == 16 + 3  # fake, global-img, fake
    proc = _splitting(processor, longest_edge=128)  # 2x2 tiles + global view
    assert max_sub_images(proc) == 5
    inputs = IDEFICS3.image_inputs(proc, _image(128, 128))
    newlines = len(proc.tokenizer("\n\n", add_special_tokens=False).input_ids) - 1
    # 4 tiles of (fake, row_col, 16 image) + 2 row breaks + (fake, global-img, 16 image, fake)
    assert IDEFICS3.num_image_tokens(proc, inputs) == 4 * 18 + 2 + 19 + newlines
    # the processor's own mask (no grid) is refused for a split image, not miscounted
    raw = proc.image_processor(images=[[_image(128, 128)]], return_tensors="pt")
    with pytest.raises(UserError, match="tile grid"):
        IDEFICS3.num_image_tokens(proc, dict(raw))


def test_labels_are_caption_and_end_of_utterance(tiny):
    _, processor = tiny
    tok = processor.tokenizer
    for proc, image in ((processor, _image()), (_splitting(processor), _image(100, 60))):
        prompt = IDEFICS3.default_prompt(proc)
        ex = encode_example(proc, IDEFICS3, image, CAPTION, prompt)
        labels = ex["labels"]
        kept = labels[labels != IGNORE_INDEX].tolist()
        assert tok.decode(kept) == " " + CAPTION + "<end_of_utterance>"
        assert tok.decode(kept, skip_special_tokens=True).strip() == CAPTION
        prompt_len = len(_prompt_ids(proc, prompt, image))
        assert (labels[:prompt_len] == IGNORE_INDEX).all()
        # training ids are the processor's ids of prompt + " caption<end_of_utterance>"
        full = proc(images=[image], text=[prompt + " " + CAPTION + "<end_of_utterance>"])
        assert ex["input_ids"].tolist() == full["input_ids"][0]


# ----------------------------------------------------------------- modules


def test_module_names_lora_targets_and_frozen_encoder(tiny):
    from galaxy_llava.models.adapt import apply_lora, freeze_vision_encoder

    model, _ = tiny
    assert IDEFICS3.vision_encoder(model) is model.model.vision_model
    assert IDEFICS3.fsdp_wrap_classes(model) == ["LlamaDecoderLayer", "Idefics3EncoderLayer"]
    assert IDEFICS3.projector_module_names() == ["connector"]
    assert IDEFICS3.unquantized_modules() == ["vision_model", "connector", "lm_head"]
    names = {n for n, p in model.named_parameters()}
    encoder = {id(p) for p in IDEFICS3.encoder_parameters(model)}
    assert not any(id(p) in encoder for p in model.model.connector.parameters())
    assert len(encoder) == len(list(model.model.vision_model.parameters()))

    lora = apply_lora(copy.deepcopy(model), projector="lora")
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in lora.named_parameters() if ".lora_A" in n}
    assert any("connector.modality_projection.proj" in n for n in adapted)
    assert not any("vision_model" in n for n in adapted)
    text = [n for n in adapted if "text_model.layers" in n]
    assert len(text) == 2 * 7 and len(adapted) == 2 * 7 + 1  # q k v o gate up down, 2 layers
    assert not any(p.requires_grad for n, p in lora.named_parameters() if "vision_model" in n)

    full = apply_lora(copy.deepcopy(model), projector="full")
    trainable = {n for n, p in full.named_parameters() if p.requires_grad}
    assert any("connector" in n and "modules_to_save" in n for n in trainable)
    assert not any("vision_model" in n for n in trainable)

    plain = copy.deepcopy(model)
    freeze_vision_encoder(plain)
    assert {n for n, p in plain.named_parameters() if not p.requires_grad} == \
        {n for n in names if n.startswith("model.vision_model.")}


# ----------------------------------------------------------------- the cached-encoder path


@pytest.mark.parametrize("split", [False, True])
def test_vision_features_are_the_encoders_output(tiny, split):
    model, processor = tiny
    proc = _splitting(processor) if split else processor
    images = [_image(100, 60, 1), _image(64, 64, 2), _image(50, 200, 3)]
    per_image = [IDEFICS3.image_inputs(proc, im) for im in images]
    batch = {k: torch.cat([p[k] for p in per_image]) for k in per_image[0]}
    feats = IDEFICS3.vision_features(model, batch)
    n = max_sub_images(proc)
    assert feats.shape == (3, n, 64, 64)  # images, sub-images, patches, encoder width
    pixels = batch["pixel_values"].flatten(0, 1)
    real = pixels.flatten(1).ne(0).any(1)
    mask = batch["pixel_attention_mask"].flatten(0, 1)[real]
    patches = mask.unfold(1, 8, 8).unfold(2, 8, 8).sum(dim=(-1, -2)) > 0
    with torch.no_grad():
        direct = model.model.vision_model(pixel_values=pixels[real],
                                          patch_attention_mask=patches).last_hidden_state
    assert torch.equal(feats.flatten(0, 1)[real], direct)
    assert not feats.flatten(0, 1)[~real].any()  # padding sub-images stay zero
    rows = IDEFICS3.split_features(feats, batch)
    assert [tuple(r.shape) for r in rows] == [(1, n, 64, 64)] * 3
    assert torch.equal(torch.cat(rows), feats)
    # one image alone gives its row of the batch
    alone = IDEFICS3.vision_features(model, per_image[2])
    assert torch.allclose(alone, rows[2], atol=1e-5)


@pytest.mark.parametrize("split", [False, True])
def test_cached_forward_gives_the_same_logits_and_gradients(tiny, split):
    model, processor = tiny
    model = copy.deepcopy(model)
    proc = _splitting(processor) if split else processor
    batch = _batch(proc, [_image(100, 60, 1), _image(64, 64, 2), _image(50, 200, 3)])
    feats = IDEFICS3.vision_features(model, batch)
    connector = model.model.connector.modality_projection.proj.weight

    def run(inputs):
        model.zero_grad(set_to_none=True)
        out = model(**inputs)
        out.loss.backward()
        return (out.logits.detach(), out.loss.detach(), connector.grad.clone(),
                model.lm_head.weight.grad.clone(),
                model.model.text_model.layers[0].self_attn.q_proj.weight.grad.clone())

    plain = run(batch)
    with IDEFICS3.cached_features(model):
        assert "get_image_features" in vars(model.model)
        cached = run({**batch, "pixel_values": feats})
        assert all(p.grad is None for p in model.model.vision_model.parameters())
    assert "get_image_features" not in vars(model.model)  # the patch is gone
    for a, b in zip(plain, cached, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    assert connector.grad is not None and connector.grad.abs().sum() > 0


def test_feature_store_rows_train_like_images(tiny, tmp_path):
    """Split images of different shapes cache into one row shape and give the uncached loss."""
    from galaxy_llava.training.batches import CaptionDataset
    from galaxy_llava.training.feature_cache import build_feature_store

    model, processor = tiny
    proc = _splitting(processor)
    paths = []
    for i, (w, h) in enumerate(SIZES[:4]):
        paths.append(str(tmp_path / f"g{i}.png"))
        _image(w, h, seed=i).save(paths[-1])
    kw = dict(dtype=torch.float32, device=torch.device("cpu"), progress=False, batch_size=3)
    store = build_feature_store(model, IDEFICS3, proc, paths, mode="memory", **kw)
    assert all(tuple(store.row(i).shape) == (1, 10, 64, 64) for i in range(4))
    # the masks kept beside the rows stay one byte per sub-image, on disk too
    assert all(e["pixel_attention_mask"].untyped_storage().nbytes() == 10 for e in store.extras)
    disk = build_feature_store(model, IDEFICS3, proc, paths, mode="disk",
                               cache_dir=tmp_path / "cache", **kw)
    assert all(torch.equal(disk.row(i), store.row(i)) for i in range(4))
    assert all(torch.equal(a["pixel_attention_mask"], b["pixel_attention_mask"])
               for a, b in zip(disk.extras, store.extras, strict=True))
    assert next((tmp_path / "cache").glob("*.extras.pt")).stat().st_size < 20_000
    records = [{"image": p, "text": CAPTION} for p in paths]
    prompt = IDEFICS3.default_prompt(proc)
    rows = {p: i for i, p in enumerate(paths)}
    collate = Collator(proc.tokenizer.pad_token_id, family=IDEFICS3, processor=proc)
    cached_set = CaptionDataset(records, proc, IDEFICS3, prompt, store, rows)
    plain_set = CaptionDataset(records, proc, IDEFICS3, prompt)
    cached = collate([cached_set[i] for i in range(4)])
    plain = collate([plain_set[i] for i in range(4)])
    assert torch.equal(cached["input_ids"], plain["input_ids"])
    for b in (cached, plain):
        b.pop("label_mask")
    with torch.no_grad():
        loss = model(**plain).loss
        with IDEFICS3.cached_features(model):
            cached_loss = model(**cached).loss
    assert torch.allclose(loss, cached_loss, atol=1e-5)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_with_and_without_cache_gives_the_same_ids(tiny, num_beams):
    from galaxy_llava.generate import _left_pad

    model, processor = tiny
    proc = _splitting(processor)
    prompt = IDEFICS3.default_prompt(proc)
    tok = proc.tokenizer
    images = [_image(100, 60, 1), _image(64, 64, 2)]
    per_image = [IDEFICS3.image_inputs(proc, im) for im in images]
    ids, mask = _left_pad([_prompt_ids(proc, prompt, im) for im in images], tok.pad_token_id)
    inputs = {k: torch.cat([p[k] for p in per_image]) for k in per_image[0]}
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
              num_beams=num_beams, pad_token_id=tok.pad_token_id,
              eos_token_id=IDEFICS3.end_ids(tok))
    with torch.no_grad():
        plain = model.generate(**inputs, **kw)
        feats = IDEFICS3.vision_features(model, inputs)
        with IDEFICS3.cached_features(model):
            cached = model.generate(**{**inputs, "pixel_values": feats}, **kw)
    assert plain.shape[1] > ids.shape[1] and torch.equal(plain, cached)


def test_describe_stops_at_end_of_utterance(tiny):
    from galaxy_llava.generate import describe_images

    model, processor = tiny
    texts = describe_images(model, processor, [_image(64, 64, 1), _image(90, 64, 2)],
                            num_beams=1, max_new_tokens=5, progress=False)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


# ----------------------------------------------------------------- loading


def test_processor_reloads_from_a_saved_folder(tiny_dir, tiny, tmp_path):
    from galaxy_llava.models.loading import load_model

    model, processor = tiny
    assert type(processor).__name__ == "Idefics3Processor"
    assert processor.image_seq_len == 16 and not processor.image_processor.do_image_splitting
    processor.save_pretrained(tmp_path / "again")
    model.save_pretrained(tmp_path / "again")
    _, again = load_model(tmp_path / "again", device="cpu")
    image = _image(100, 60)
    for proc in (processor, again):
        assert IDEFICS3.default_prompt(proc) == IDEFICS3.default_prompt(processor)
        assert _prompt_ids(proc, IDEFICS3.default_prompt(proc), image) == \
            _prompt_ids(processor, IDEFICS3.default_prompt(processor), image)
        assert torch.equal(IDEFICS3.image_inputs(proc, image)["pixel_values"],
                           IDEFICS3.image_inputs(processor, image)["pixel_values"])


def test_fix_processor_refuses_a_mismatched_processor(tiny):
    model, processor = tiny
    IDEFICS3.fix_processor(processor, model.config)
    wrong = copy.deepcopy(processor)
    wrong.image_seq_len = 64
    with pytest.raises(UserError, match="image tokens per sub-image"):
        IDEFICS3.fix_processor(wrong, model.config)
    wrong = copy.deepcopy(processor)
    wrong.image_processor.max_image_size = {"longest_edge": 32}
    with pytest.raises(UserError, match="max_image_size"):
        IDEFICS3.fix_processor(wrong, model.config)


# ----------------------------------------------------------------- SmolVLM2 (model_type smolvlm)


@pytest.fixture(scope="module")
def tiny_smolvlm(tiny, tmp_path_factory):
    """A tiny SmolVLMForConditionalGeneration with the image-only SmolVLM processor, saved and
    reloaded through load_model (AutoProcessor cannot build SmolVLMProcessor here: no
    torchvision for its video processor, no num2words)."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    from galaxy_llava.models.idefics3 import image_only_smolvlm_processor_class
    from galaxy_llava.models.loading import load_model

    idefics, processor = tiny
    cfg = idefics.config
    config = SmolVLMConfig(vision_config=cfg.vision_config.to_dict(),
                           text_config=cfg.text_config.to_dict(), scale_factor=cfg.scale_factor,
                           image_token_id=cfg.image_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = SmolVLMForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    ip = SmolVLMImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 64},
                                  do_image_splitting=False)
    proc = image_only_smolvlm_processor_class()(
        image_processor=ip, tokenizer=copy.deepcopy(processor.tokenizer), image_seq_len=16,
        chat_template=processor.chat_template)
    out = tmp_path_factory.mktemp("smolvlm") / "m"
    model.save_pretrained(out)
    proc.save_pretrained(out)
    loaded, reloaded = load_model(out, device="cpu", dtype=torch.float32)
    return loaded.eval(), reloaded


@pytest.mark.parametrize("split", [False, True])
def test_smolvlm_prompt_ids_and_cached_forward(tiny_smolvlm, split):
    model, processor = tiny_smolvlm
    assert model.config.model_type == "smolvlm" and family_for(model) is IDEFICS3
    assert type(processor).__name__ == "ImageOnlySmolVLMProcessor"
    assert processor.to_dict()["processor_class"] == "SmolVLMProcessor"
    proc = _splitting(processor) if split else processor
    prompt = IDEFICS3.default_prompt(proc)
    assert prompt.endswith("<end_of_utterance>\nAssistant:")
    for width, height in SIZES[:3]:
        image = _image(width, height)
        ref = proc(images=[image], text=[prompt], return_tensors="pt")
        assert _prompt_ids(proc, prompt, image) == ref["input_ids"][0].tolist()
    batch = _batch(proc, [_image(100, 60, 1), _image(60, 100, 2)])
    feats = IDEFICS3.vision_features(model, batch)
    with torch.no_grad():
        plain = model(**batch)
        with IDEFICS3.cached_features(model):
            cached = model(**{**batch, "pixel_values": feats})
    assert torch.allclose(plain.logits, cached.logits, atol=1e-5)
    assert torch.allclose(plain.loss, cached.loss, atol=1e-6)
