"""feature_cache: the frozen encoder's output once per image, in memory or on disk."""

from __future__ import annotations

import pytest
import torch

from galaxy_llava.training.feature_cache import build_feature_store

pytestmark = pytest.mark.usefixtures("one_thread")


def test_disk_cache_matches_memory_is_reused_and_keeps_bf16(tiny_model_dir, prepared_dir,
                                                            tmp_path):
    from galaxy_llava.models.registry import family_for
    from galaxy_llava.models.loading import load_model
    from galaxy_llava.records import load_records

    model, processor = load_model(tiny_model_dir, device="cpu", dtype=torch.float32)
    family = family_for(model)
    paths = [r["image"] for r in load_records(prepared_dir, "train")[:5]]
    kw = dict(dtype=torch.float32, device=torch.device("cpu"), progress=False, batch_size=2)
    mem = build_feature_store(model, family, processor, paths, mode="memory", **kw)
    assert len(mem) == 5 and mem.row(0).shape == family.feature_shape(model.config)
    pixels = family.pixel_values(processor, [__import__("PIL.Image").Image.open(paths[3])
                                             .convert("RGB")])
    assert torch.equal(mem.row(3), family.vision_features(model, pixels)[0])
    disk = build_feature_store(model, family, processor, paths, mode="disk", cache_dir=tmp_path,
                               **kw)
    files = list(tmp_path.glob("features-*.npy"))
    assert len(files) == 1 and not list(tmp_path.glob(".*partial"))
    assert all(torch.equal(mem.row(i), disk.row(i)) for i in range(5))
    mtime = files[0].stat().st_mtime_ns
    again = build_feature_store(model, family, processor, paths, mode="disk", cache_dir=tmp_path,
                                **kw)
    assert files[0].stat().st_mtime_ns == mtime and torch.equal(again.row(1), mem.row(1))
    bf = build_feature_store(model, family, processor, paths, mode="disk", cache_dir=tmp_path,
                             **dict(kw, dtype=torch.bfloat16))
    assert len(list(tmp_path.glob("features-*.npy"))) == 2  # the dtype is part of the key
    assert torch.equal(bf.row(3), mem.row(3).bfloat16())
