"""layouts: a local copy of a whole dataset repository (mwalmsley/gz2's layout: data/ for the
default config, tiny/, and older all/ and evo/ with another schema) is read one config at a time,
by folder or by the dataset card's ``configs:``; configs never mix."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from galaxy_llava.gz2_catalog import load_catalog
from galaxy_llava.errors import UserError
from galaxy_llava.prepare import prepare
from test_gz2_catalog import images_for, make_votes, write_hub_parquet


def write_repo(root, readme: str | None = None):
    """The repository layout: data/ (30 galaxies), tiny/ (12 others), all/ and evo/ in the old
    schema (t01_... columns). Returns {config: [id_str]}."""
    ids = {}
    for name, n, seed in (("data", 30, 1), ("tiny", 12, 2)):
        df = make_votes(n, seed=seed)
        write_hub_parquet(df, images_for(df), root / f"_{name}", shards=1)
        (root / f"_{name}" / "data").rename(root / name)
        (root / f"_{name}").rmdir()
        ids[name] = df["id_str"].tolist()
    for name in ("all", "evo"):
        (root / name).mkdir()
        old = pa.table({"id_str": [f"old{i}" for i in range(5)], "image": [b"x"] * 5,
                        "t01_smooth_or_features_a01_smooth_fraction": [0.5] * 5})
        pq.write_table(old, root / name / "train-00000-of-00001.parquet")
    if readme is not None:
        (root / "README.md").write_text(readme)
    return ids


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("gz2-repo")
    return root, write_repo(root)


def test_folder_per_config_default_is_data(repo):
    root, ids = repo
    assert load_catalog(root).votes["id_str"].tolist() == ids["data"]
    assert load_catalog(root, hub_config="default").votes["id_str"].tolist() == ids["data"]
    assert load_catalog(root, hub_config="tiny").votes["id_str"].tolist() == ids["tiny"]
    with pytest.raises(UserError, match=r"evo/train-00000-of-00001.parquet: missing column"):
        load_catalog(root, hub_config="evo")
    with pytest.raises(UserError, match=r"holds the dataset configs all, data, evo, tiny "
                                        r"\(data is the default\); --hub-config 'nope' is none"):
        load_catalog(root, hub_config="nope")
    with pytest.raises(UserError, match="none of split 'test'.*--hub-split train"):
        load_catalog(root, hub_config="tiny", hub_split="test")


def test_dataset_card_configs(tmp_path):
    card = ("---\nlicense: cc-by-4.0\nconfigs:\n- config_name: main\n  default: true\n"
            "  data_files:\n  - split: train\n    path: data/train-*\n"
            "- config_name: tiny\n  data_files: tiny/train-*\n---\n# GZ2\n")
    ids = write_repo(tmp_path, readme=card)
    assert load_catalog(tmp_path).votes["id_str"].tolist() == ids["data"]
    assert load_catalog(tmp_path, hub_config="main").votes["id_str"].tolist() == ids["data"]
    assert load_catalog(tmp_path, hub_config="tiny").votes["id_str"].tolist() == ids["tiny"]
    with pytest.raises(UserError, match="config 'main' of .* has split\\(s\\) train, not 'test'"):
        load_catalog(tmp_path, hub_split="test")
    with pytest.raises(UserError, match=r"configs main, tiny \(main is the default\); "
                                        r"--hub-config 'evo'"):
        load_catalog(tmp_path, hub_config="evo")  # the card lists no evo: not read


def test_prepare_reads_the_default_config_only(repo, tmp_path):
    root, ids = repo
    out = tmp_path / "out"
    prepare(root, out, n_per_class=4, image_size=32, workers=1)
    records = [json.loads(x) for x in (out / "dataset.jsonl").read_text().splitlines()]
    assert records and {r["id_str"] for r in records} <= set(ids["data"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["catalog_rows"] == len(ids["data"])
