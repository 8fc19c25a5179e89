"""feature_cache: the frozen encoder's output once per image, in memory or on disk, with each
image's other inputs (extras) kept beside its row."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from galaxy_llava.errors import UserError
from galaxy_llava.training.feature_cache import FeatureStore, build_feature_store

pytestmark = pytest.mark.usefixtures("one_thread")


def test_disk_cache_matches_memory_is_reused_and_keeps_bf16(tiny_model_dir, prepared_dir,
                                                            tmp_path):
    from galaxy_llava.models.registry import family_for
    from galaxy_llava.models.loading import load_model
    from galaxy_llava.records import load_image, load_records

    model, processor = load_model(tiny_model_dir, device="cpu", dtype=torch.float32)
    family = family_for(model)
    paths = [r["image"] for r in load_records(prepared_dir, "train")[:5]]
    kw = dict(dtype=torch.float32, device=torch.device("cpu"), progress=False, batch_size=2)
    mem = build_feature_store(model, family, processor, paths, mode="memory", **kw)
    # one cat-able row per image: [1, image tokens, encoder width]
    shape = (1, family.image_token_count(model.config), model.config.vision_config.hidden_size)
    assert len(mem) == 5 and all(tuple(mem.row(i).shape) == shape for i in range(5))
    inputs = family.image_inputs(processor, load_image(paths[3]))
    assert torch.equal(mem.row(3), family.vision_features(model, inputs))
    # the rows concatenate back into the features of the batch of all five images
    batch = torch.cat([family.image_inputs(processor, load_image(p))["pixel_values"]
                       for p in paths])
    assert torch.allclose(torch.cat([mem.row(i) for i in range(5)]),
                          family.vision_features(model, {"pixel_values": batch}), atol=1e-6)
    # LLaVA has no inputs besides pixel_values: the cached ones are the row alone
    assert mem.extras == [{}] * 5
    assert set(mem.inputs(3)) == {"pixel_values"} and torch.equal(mem.inputs(3)["pixel_values"],
                                                                  mem.row(3))
    disk = build_feature_store(model, family, processor, paths, mode="disk", cache_dir=tmp_path,
                               **kw)
    files = list(tmp_path.glob("features-*.npy"))
    extras = list(tmp_path.glob("features-*.extras.pt"))
    assert len(files) == 1 and not list(tmp_path.glob(".*partial*"))
    assert [e.name for e in extras] == [files[0].name.replace(".npy", ".extras.pt")]
    assert all(torch.equal(mem.row(i), disk.row(i)) for i in range(5))
    assert disk.extras == mem.extras and torch.equal(disk.inputs(2)["pixel_values"], mem.row(2))
    mtime = files[0].stat().st_mtime_ns, extras[0].stat().st_mtime_ns
    again = build_feature_store(model, family, processor, paths, mode="disk", cache_dir=tmp_path,
                                **kw)
    assert (files[0].stat().st_mtime_ns, extras[0].stat().st_mtime_ns) == mtime
    assert torch.equal(again.row(1), mem.row(1))
    bf = build_feature_store(model, family, processor, paths, mode="disk", cache_dir=tmp_path,
                             **dict(kw, dtype=torch.bfloat16))
    assert len(list(tmp_path.glob("features-*.npy"))) == 2  # the dtype is part of the key
    assert len(list(tmp_path.glob("features-*.extras.pt"))) == 2
    assert torch.equal(bf.row(3), mem.row(3).bfloat16())
    assert bf.inputs(3)["pixel_values"].dtype == torch.bfloat16


# ----------------------------------------------------------------- FeatureStore.inputs


def test_feature_store_inputs_are_the_extras_and_the_row(tmp_path):
    rows = torch.randn(3, 1, 4, 8)
    grids = [{"image_grid_thw": torch.tensor([[1, 2, i + 1]])} for i in range(3)]
    mem = FeatureStore(rows, torch.float32, grids)
    for i in range(3):
        got = mem.inputs(i)
        assert set(got) == {"image_grid_thw", "pixel_values"}
        assert torch.equal(got["pixel_values"], rows[i]) and got["pixel_values"].shape == (1, 4, 8)
        assert torch.equal(got["image_grid_thw"], grids[i]["image_grid_thw"])
    # the rows of a batch concatenate along dim 0, the extras too
    assert torch.cat([mem.inputs(i)["pixel_values"] for i in (2, 0)]).shape == (2, 4, 8)
    # the cached row wins over an extra of the same name; the extras are not changed
    clash = FeatureStore(rows, torch.float32, [{"pixel_values": torch.zeros(1)}] * 3)
    assert torch.equal(clash.inputs(1)["pixel_values"], rows[1])
    assert torch.equal(clash.extras[1]["pixel_values"], torch.zeros(1))
    # no extras: one empty dict per row
    plain = FeatureStore(rows, torch.float32)
    assert plain.extras == [{}] * 3 and set(plain.inputs(0)) == {"pixel_values"}
    # a bf16 memmap (raw 16-bit patterns) gives bf16 rows
    bf = rows.bfloat16()
    path = tmp_path / "rows.npy"
    np.save(path, bf.view(torch.int16).numpy().view(np.uint16))
    disk = FeatureStore(np.load(path, mmap_mode="r"), torch.bfloat16, grids)
    assert torch.equal(disk.inputs(2)["pixel_values"], bf[2])
    assert torch.equal(disk.inputs(2)["image_grid_thw"], grids[2]["image_grid_thw"])


# ----------------------------------------------------------------- a family with extra inputs


class _Encoder(torch.nn.Module):
    """A stand-in model: ``config`` and one parameter (what ``cache_key`` fingerprints)."""

    config = "stand-in"

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))


class _GridFamily:
    """Qwen-like image inputs: one 8-wide patch row per 8 px of width, and a grid row per image;
    the "encoder" doubles the patches and splits them per image by the grid."""

    def image_inputs(self, processor, image) -> dict:
        n = image.width // 8
        return {"pixel_values": torch.full((n, 8), float(image.getpixel((0, 0))[0])),
                "image_grid_thw": torch.tensor([[1, 1, n]])}

    def vision_features(self, model, image_inputs: dict):
        return image_inputs["pixel_values"] * 2

    def split_features(self, features, image_inputs: dict) -> list:
        return list(features.split(image_inputs["image_grid_thw"].prod(-1).tolist()))

    def vision_encoder(self, model):
        return model


def _images(folder, widths) -> list[str]:
    paths = []
    for i, w in enumerate(widths):
        paths.append(str(folder / f"{i}.png"))
        Image.new("RGB", (w, 8), (10 * i, 0, 0)).save(paths[-1])
    return paths


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_extras_are_stored_beside_the_rows(tmp_path, mode):
    family, model = _GridFamily(), _Encoder()
    paths = _images(tmp_path, [32] * 5)
    store = build_feature_store(model, family, None, paths, mode=mode, dtype=torch.float32,
                                device=torch.device("cpu"), batch_size=2, progress=False,
                                cache_dir=tmp_path / "cache")
    assert len(store) == 5 and model.training  # the model's mode is restored
    for i in range(5):
        got = store.inputs(i)
        assert set(got) == {"pixel_values", "image_grid_thw"}
        assert torch.equal(got["pixel_values"], torch.full((4, 8), 20.0 * i))
        assert torch.equal(got["image_grid_thw"], torch.tensor([[1, 1, 4]]))
    if mode == "disk":
        assert len(list((tmp_path / "cache").glob("features-*.extras.pt"))) == 1
        again = build_feature_store(model, family, None, paths, mode=mode, dtype=torch.float32,
                                    device=torch.device("cpu"), progress=False,
                                    cache_dir=tmp_path / "cache")
        assert all(torch.equal(again.inputs(i)["image_grid_thw"], store.extras[i]["image_grid_thw"])
                   for i in range(5))


def test_images_of_different_feature_sizes_are_refused(tmp_path):
    paths = _images(tmp_path, [32, 32, 40])
    with pytest.raises(UserError, match="different sizes"):
        build_feature_store(_Encoder(), _GridFamily(), None, paths, mode="memory",
                            dtype=torch.float32, device=torch.device("cpu"), progress=False)
