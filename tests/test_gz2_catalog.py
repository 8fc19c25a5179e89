"""catalog: the four source kinds, column validation, lazy images, offline Hub handling.

Also home of the small catalogue builders that test_prepare.py imports (a few dozen rows, PIL-drawn
images, written in the Hub parquet layout, as a CSV with file_loc, and with save_to_disk).
"""

from __future__ import annotations

import io
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from galaxy_llava import gz2_catalog as cat_mod
from galaxy_llava.gz2_catalog import ImageError, decode_image, load_catalog
from galaxy_llava.errors import UserError
from galaxy_llava.gz2 import QUESTIONS, col, count_col, votes_col
from galaxy_llava.rules import rule_set

# Thresholds of the reference rules: exact values test the strict ">" comparisons.
_EDGES = (0.4, 0.5, 0.6)


def make_votes(n: int = 40, seed: int = 0, n_elliptical: int | None = None,
               counts: bool = False) -> pd.DataFrame:
    """A GZ2-schema vote table: totals and fractions for every question; questions off the
    galaxy's branch are NaN, some fractions sit exactly on the rules' thresholds.
    ``n_elliptical`` rows (at most n - 1) have smooth fraction > 0.6. The fractions are drawn,
    not counted, so the rounded vote counts (``counts``) only roughly agree with them: the
    tests of reading counts build their own rows."""
    rng = np.random.default_rng(seed)
    n_ell = n // 2 + 4 if n_elliptical is None else n_elliptical
    data: dict[str, list] = {"id_str": [f"58772{seed:03d}{i:06d}" for i in range(n)]}
    for q, answers in QUESTIONS.items():
        total = rng.integers(0, 40, n).astype(float)
        fr = rng.dirichlet(np.full(len(answers), 0.4), n)
        # Push one answer over 0.5 often, so captions carry attributes.
        strong = rng.random(n) < 0.6
        fr[strong] = 0.05 / max(1, len(answers) - 1)
        pick = rng.integers(0, len(answers), n)
        fr[strong, pick[strong]] = 0.95 if len(answers) > 1 else 1.0
        fr = fr / fr.sum(axis=1, keepdims=True)
        unreached = rng.random(n) < (0.0 if q in ("smooth-or-featured", "something-odd") else 0.35)
        fr[unreached] = np.nan
        total[unreached] = 0
        for j, a in enumerate(answers):
            data[count_col(q, a)] = np.round(np.nan_to_num(fr[:, j]) * total)
            data[col(q, a)] = fr[:, j]
        data[votes_col(q)] = total
    df = pd.DataFrame(data)
    smooth = col("smooth-or-featured", "smooth")
    ell = np.zeros(n, bool)
    ell[1 + rng.permutation(n - 1)[:n_ell]] = True  # row 0 sits at exactly 0.6: a spiral
    df[smooth] = np.where(ell, rng.uniform(0.61, 1.0, n), rng.uniform(0.0, 0.6, n))
    for k, edge in enumerate(_EDGES):  # a few exact-threshold rows
        for c in (col("bar", "yes"), col("something-odd", "yes"),
                  col("how-rounded", "round")):
            df.loc[(3 * k + 1) % n, c] = edge
    df.loc[0, smooth] = 0.6  # exactly 0.6 is not elliptical
    if not counts:
        df = df.drop(columns=[count_col(q, a) for q, answers in QUESTIONS.items()
                              for a in answers])
    return df


def draw_galaxy(i: int, size: int = 48, fmt: str = "JPEG", shape: tuple | None = None) -> bytes:
    """A small image of an ellipse, different for each i."""
    w, h = shape or (size, size)
    img = Image.new("RGB", (w, h))
    d = ImageDraw.Draw(img)
    r = 4 + i % (min(w, h) // 3)
    d.ellipse([w // 2 - r, h // 2 - r // 2, w // 2 + r, h // 2 + r // 2],
              fill=(200, 150 + i % 100, 100))
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def images_for(df: pd.DataFrame) -> list[bytes]:
    return [draw_galaxy(i) for i in range(len(df))]


_IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def write_hub_parquet(df: pd.DataFrame, images: list[bytes | None], folder, shards: int = 2,
                      split: str = "train"):
    """The Hub layout: folder/data/{split}-0000k-of-0000n.parquet, image struct column."""
    out = folder / "data"
    out.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, len(df), shards + 1).astype(int)
    for k in range(shards):
        part = df.iloc[bounds[k]:bounds[k + 1]].reset_index(drop=True)
        table = pa.Table.from_pandas(part, preserve_index=False)
        imgs = pa.array([{"bytes": b, "path": None} for b in images[bounds[k]:bounds[k + 1]]],
                        type=_IMAGE_TYPE)
        table = table.add_column(0, "image", imgs)
        pq.write_table(table, out / f"{split}-{k:05d}-of-{shards:05d}.parquet", row_group_size=7)
    return folder


def write_csv(df: pd.DataFrame, images: list[bytes], folder, absolute_every: int = 3):
    """A CSV with file_loc: mostly paths relative to the CSV's folder, some absolute."""
    (folder / "imgs").mkdir(parents=True, exist_ok=True)
    locs = []
    for i, b in enumerate(images):
        p = folder / "imgs" / f"g{i}.jpg"
        p.write_bytes(b)
        locs.append(str(p) if i % absolute_every == 0 else f"imgs/g{i}.jpg")
    df = df.assign(file_loc=locs)
    path = folder / "gz2.csv"
    df.to_csv(path, index=False)
    return path


def write_disk(df: pd.DataFrame, images: list[bytes], folder, split: str | None = None):
    """A datasets save_to_disk folder with an Image feature (a DatasetDict when split given)."""
    import datasets

    feats = datasets.Features({"image": datasets.Image(),
                               **datasets.Features.from_arrow_schema(
                                   pa.Schema.from_pandas(df, preserve_index=False))})
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": b, "path": None} for b in images], **df.to_dict("list")},
        features=feats)
    if split:
        ds = datasets.DatasetDict({split: ds})
    ds.save_to_disk(str(folder))
    return folder


REF = list(rule_set("reference").columns)


@pytest.fixture(scope="module")
def votes():
    return make_votes(30, seed=3)


@pytest.fixture
def no_decode(monkeypatch):
    """Fail loudly if anything decodes an image while the catalogue is opened."""
    def boom(*a, **k):
        raise AssertionError("an image was decoded while loading the catalogue")
    monkeypatch.setattr(Image, "open", boom)


def _check_catalog(c, df, rules="reference"):
    assert len(c) == len(df)
    assert list(c.votes.columns)[:len(rule_set(rules).columns) + 1] == [
        "id_str", *rule_set(rules).columns]
    assert c.votes["id_str"].tolist() == df["id_str"].tolist()
    for name in rule_set(rules).columns:
        np.testing.assert_array_equal(c.votes[name].to_numpy(), df[name].to_numpy())


# ---------------------------------------------------------------- the four sources

def test_parquet_folder_reads_only_vote_columns(tmp_path, votes, monkeypatch):
    write_hub_parquet(votes, images_for(votes), tmp_path, shards=3)
    reads = []
    real = pq.ParquetFile.read
    monkeypatch.setattr(pq.ParquetFile, "read",
                        lambda self, *a, **k: reads.append(k.get("columns")) or real(self, *a, **k))
    with monkeypatch.context() as m:
        m.setattr(Image, "open", lambda *a, **k: (_ for _ in ()).throw(AssertionError("decoded")))
        c = load_catalog(tmp_path)
    assert c.kind == "parquet" and len(reads) == 3
    assert all(cols is not None and "image" not in cols for cols in reads)
    _check_catalog(c, votes)
    # images on demand, across shards and row groups, in storage order
    got = {row: data for row, data, err in c.image_bytes([25, 2, 14, 2])}
    assert sorted(got) == [2, 14, 25]
    assert got[14] == draw_galaxy(14)
    assert c.image(25).size == (48, 48) and c.image(25).mode == "RGB"


def test_single_parquet_file_and_tree_columns(tmp_path, votes):
    write_hub_parquet(votes, images_for(votes), tmp_path, shards=1)
    c = load_catalog(tmp_path / "data" / "train-00000-of-00001.parquet", rules="tree")
    _check_catalog(c, votes, rules="tree")


def test_parquet_folder_picks_the_split(tmp_path, votes):
    write_hub_parquet(votes, images_for(votes), tmp_path, shards=2, split="train")
    test_part = votes.iloc[:5].assign(id_str=[f"t{i}" for i in range(5)])
    write_hub_parquet(test_part, images_for(test_part), tmp_path, shards=1, split="test")
    assert len(load_catalog(tmp_path)) == len(votes)
    assert load_catalog(tmp_path, hub_split="test").votes["id_str"].tolist() == list(
        test_part["id_str"])
    with pytest.raises(UserError, match="none of split 'validation'.*--hub-split"):
        load_catalog(tmp_path, hub_split="validation")


def test_csv_with_relative_and_absolute_paths(tmp_path, votes, no_decode):
    path = write_csv(votes, images_for(votes), tmp_path)
    c = load_catalog(path)
    assert c.kind == "csv"
    _check_catalog(c, votes)
    got = dict((row, data) for row, data, _ in c.image_bytes([0, 1, 2]))
    assert got == {i: draw_galaxy(i) for i in (0, 1, 2)}  # 0 absolute, 1-2 relative


def test_csv_keeps_long_ids_as_text(tmp_path):
    df = make_votes(6, seed=1).assign(id_str=[str(587722981741363294 + i) for i in range(6)])
    c = load_catalog(write_csv(df, images_for(df), tmp_path))
    assert c.votes["id_str"].tolist() == df["id_str"].tolist()


@pytest.mark.parametrize("split", [None, "train"])
def test_save_to_disk(tmp_path, votes, split, no_decode):
    write_disk(votes, images_for(votes), tmp_path / "ds", split=split)
    c = load_catalog(tmp_path / "ds")
    assert c.kind == "save_to_disk"
    _check_catalog(c, votes)
    got = dict((row, data) for row, data, _ in c.image_bytes([29, 3]))
    assert got == {3: draw_galaxy(3), 29: draw_galaxy(29)}
    if split:
        with pytest.raises(UserError, match="splits train, not 'test'"):
            load_catalog(tmp_path / "ds", hub_split="test")


# ---------------------------------------------------------------- bad input

def test_missing_columns_named_in_one_line(tmp_path, votes):
    gone = [col("bar", "yes"), col("bulge-shape", "boxy")]
    write_hub_parquet(votes.drop(columns=gone + ["id_str"]), images_for(votes), tmp_path)
    with pytest.raises(UserError) as e:
        load_catalog(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and all(c in msg for c in gone + ["id_str"])


def test_tree_rules_need_vote_totals(tmp_path, votes):
    gone = votes_col("bar")
    write_hub_parquet(votes.drop(columns=[gone]), images_for(votes), tmp_path)
    load_catalog(tmp_path)  # the reference rules do not read it
    with pytest.raises(UserError, match=gone):
        load_catalog(tmp_path, rules="tree")


@pytest.mark.parametrize("kind", ["parquet", "csv", "disk"])
def test_wrong_type_column(tmp_path, votes, kind):
    bad = col("bulge-size", "obvious")
    df = votes.assign(**{bad: ["high"] * len(votes)})
    if kind == "parquet":
        src = write_hub_parquet(df, images_for(df), tmp_path)
    elif kind == "csv":
        src = write_csv(df, images_for(df), tmp_path)
    else:
        src = write_disk(df, images_for(df), tmp_path / "ds")
    with pytest.raises(UserError, match=f"non-numeric column.*{bad}"):
        load_catalog(src)


def test_bool_column_is_wrong_type(tmp_path, votes):
    bad = col("bar", "yes")
    write_hub_parquet(votes.assign(**{bad: votes[bad] > 0.5}), images_for(votes), tmp_path)
    with pytest.raises(UserError, match=f"{bad} \\(bool\\)"):
        load_catalog(tmp_path)


def test_no_image_column(tmp_path, votes):
    (tmp_path / "x").mkdir()
    votes.to_parquet(tmp_path / "x" / "cat.parquet")
    with pytest.raises(UserError, match="missing column.*image or file_loc"):
        load_catalog(tmp_path / "x")


@pytest.mark.parametrize("source", ["nowhere/gz2.parquet", "gz2", "./missing-folder",
                                    "/no/such/catalogue.csv"])
def test_missing_local_source(tmp_path, monkeypatch, source):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="not found"):
        load_catalog(source)


def test_empty_folder_and_unknown_file(tmp_path):
    with pytest.raises(UserError, match="no parquet files"):
        load_catalog(tmp_path)
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(UserError, match="not a parquet or CSV"):
        load_catalog(tmp_path / "a.txt")
    (tmp_path / "b.parquet").write_bytes(b"not parquet")
    with pytest.raises(UserError, match="cannot read parquet"):
        load_catalog(tmp_path / "b.parquet")


def test_hub_id_offline_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    t = time.monotonic()
    with pytest.raises(UserError) as e:
        load_catalog("mwalmsley/gz2")
    assert time.monotonic() - t < 20
    msg = str(e.value)
    assert "\n" not in msg and "unreachable" in msg and "--source path/to/gz2" in msg


def test_hub_unreachable_without_offline_flag_fails_fast(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    t = time.monotonic()
    with pytest.raises(UserError, match="unreachable.*HF_HUB_OFFLINE=1.*local copy"):
        load_catalog("mwalmsley/gz2")
    assert time.monotonic() - t < 5


def test_hub_id_goes_through_load_dataset(monkeypatch, votes):
    """The Hub path without a network: load_dataset is faked, everything after it is real."""
    import datasets

    calls = []
    ds = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None}
                                               for b in images_for(votes)],
                                     **votes.to_dict("list")})
    monkeypatch.setattr(cat_mod, "_hub_offline", lambda: False)
    monkeypatch.setattr(cat_mod, "_hub_reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or ds)
    c = load_catalog("mwalmsley/gz2", hub_config="tiny", hub_split="test")
    assert calls == [(("mwalmsley/gz2", "tiny"), {"split": "test"})] and c.kind == "hub"
    _check_catalog(c, votes)
    assert dict((r, d) for r, d, _ in c.image_bytes([7])) == {7: draw_galaxy(7)}

    def missing(*a, **k):
        raise datasets.exceptions.DatasetNotFoundError("nope")
    monkeypatch.setattr(datasets, "load_dataset", missing)
    with pytest.raises(UserError, match="no dataset 'someone/gz3' on the Hugging Face Hub"):
        load_catalog("someone/gz3")

    def bad_config(*a, **k):
        raise ValueError("BuilderConfig 'huge' not found. Available: ['default', 'tiny']\nmore")
    monkeypatch.setattr(datasets, "load_dataset", bad_config)
    with pytest.raises(UserError, match="config huge.*Available: \\['default', 'tiny'\\]$"):
        load_catalog("mwalmsley/gz2", hub_config="huge")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decode_image_refuses_bad_bytes(monkeypatch):
    good = draw_galaxy(5)
    assert decode_image(good).size == (48, 48)
    with pytest.raises(ImageError, match="unreadable"):
        decode_image(b"definitely not an image")
    with pytest.raises(ImageError, match="unreadable"):
        decode_image(good[: len(good) // 2])  # truncated JPEG
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 48x48 now counts as a bomb
    with pytest.raises(ImageError, match="decompression bomb"):
        decode_image(good)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # between the limit and twice it
    with pytest.raises(ImageError, match="decompression bomb"):
        decode_image(good)


def test_image_of_unreadable_row_is_a_user_error(tmp_path, votes):
    imgs = images_for(votes)
    imgs[4] = b"garbage"
    c = load_catalog(write_hub_parquet(votes, imgs, tmp_path))
    with pytest.raises(UserError, match=f"galaxy {votes.id_str[4]}: unreadable"):
        c.image(4)


# ---------------------------------------------------------------- GZ2 catalogues as they exist

def counted_votes(n: int = 25, seed: int = 0) -> pd.DataFrame:
    """Votes as the Hub stores them: volunteers walk the tree (counts add up), totals, and the
    fractions count / total stored as float32."""
    from galaxy_llava import gz2

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        counts: dict[str, dict[str, int]] = {}
        row: dict = {"id_str": f"5877{seed:02d}{i:06d}"}
        for q in gz2.ASK_ORDER:
            asked = gz2.n_asked(q, int(rng.integers(30, 50)) if q == gz2.ROOT else 0, counts)
            drawn = rng.multinomial(asked, rng.dirichlet(np.full(len(QUESTIONS[q]), 0.5)))
            counts[q] = dict(zip(QUESTIONS[q], drawn.tolist()))
            row[votes_col(q)] = asked
            for a in QUESTIONS[q]:
                row[count_col(q, a)] = counts[q][a]
                row[col(q, a)] = np.float32(counts[q][a] / asked) if asked else np.nan
        rows.append(row)
    df = pd.DataFrame(rows)
    return df.astype({col(q, a): "float32" for q, answers in QUESTIONS.items() for a in answers})


def _fraction_columns():
    return [col(q, a) for q, answers in QUESTIONS.items() for a in answers]


@pytest.mark.parametrize("rules", ["reference", "tree"])
def test_an_old_revision_without_fraction_columns_derives_them(tmp_path, rules):
    """Older revisions of mwalmsley/gz2 hold counts and totals only: before, a missing-columns
    error; now count / total, equal to the stored fractions where a file has both."""
    df = counted_votes(25, seed=1)
    write_hub_parquet(df, images_for(df), tmp_path / "new", shards=1)
    old = df.drop(columns=_fraction_columns())
    write_hub_parquet(old, images_for(old), tmp_path / "old", shards=1)
    with_both = load_catalog(tmp_path / "new", rules=rules)
    derived = load_catalog(tmp_path / "old", rules=rules)
    for c in rule_set(rules).columns:
        np.testing.assert_allclose(derived.votes[c], with_both.votes[c], rtol=1e-7)
        stored = df[c].to_numpy(np.float64)  # the float32 fractions themselves
        np.testing.assert_allclose(derived.votes[c], stored, rtol=1e-7)
    assert derived.votes[col("bar", "yes")].isna().sum() > 0  # unreached stays NaN
    # a needed column neither stored nor derivable is still named
    write_hub_parquet(old.drop(columns=[count_col("bar", "yes")]), images_for(old),
                      tmp_path / "worse", shards=1)
    with pytest.raises(UserError, match="missing column.*bar-gz2_yes_fraction"):
        load_catalog(tmp_path / "worse", rules=rules)


def test_extra_columns_load_where_present_and_are_nan_where_not(tmp_path):
    df = counted_votes(6, seed=2).drop(columns=[col("bulge-size", "dominant")])
    write_hub_parquet(df, images_for(df), tmp_path, shards=1)
    extra = (col("bulge-size", "dominant"), col("disk-edge-on", "no"), "not-a-gz2-column")
    c = load_catalog(tmp_path, extra=extra)
    assert list(c.votes.columns) == ["id_str", *rule_set("reference").columns, *extra]
    np.testing.assert_allclose(c.votes[extra[0]], df[count_col("bulge-size", "dominant")]
                               / df[votes_col("bulge-size")].where(lambda v: v > 0))
    assert c.votes[extra[2]].isna().all()


def _galaxy_datasets_layout(folder, df):
    """galaxy-datasets' gz2 download: gz2_train_catalog.parquet with subfolder and filename,
    images under images/<subfolder>/<filename>."""
    subs = [str(i)[:6] for i in df["id_str"]]
    names = [f"{i}.jpg" for i in df["id_str"]]
    for k, (s, f) in enumerate(zip(subs, names)):
        (folder / "images" / s).mkdir(parents=True, exist_ok=True)
        (folder / "images" / s / f).write_bytes(draw_galaxy(k))
    path = folder / "gz2_train_catalog.parquet"
    df.assign(subfolder=subs, filename=names).to_parquet(path, index=False)
    return path


def test_galaxy_datasets_layout_reads_with_images_root(tmp_path):
    """Before: "no image or file_loc column"; now subfolder + filename under the images
    folder: images/ beside the catalogue by default, or --images-root."""
    df = counted_votes(8, seed=3).assign(id_str=[f"5877{i:02d}98174136329{i}" for i in range(8)])
    path = _galaxy_datasets_layout(tmp_path / "gz2", df)
    c = load_catalog(path)
    assert {r: d for r, d, _ in c.image_bytes([0, 5])} == {0: draw_galaxy(0), 5: draw_galaxy(5)}
    moved = tmp_path / "elsewhere"
    (tmp_path / "gz2" / "images").rename(moved)
    c = load_catalog(path, images_root=moved)
    ((_, data, err),) = list(c.image_bytes([3]))
    assert err is None and data == draw_galaxy(3)
    assert c.image(3).size == (48, 48)
    # CSV flavour, and paths that climb out of the images root are refused
    csv = tmp_path / "gz2.csv"
    df.assign(subfolder=[str(i)[:6] for i in df["id_str"]],
              filename=[f"{i}.jpg" for i in df["id_str"]]).to_csv(csv, index=False)
    assert load_catalog(csv, images_root=moved).image(1).size == (48, 48)
    df.assign(subfolder="..", filename="x.jpg").to_csv(csv, index=False)
    with pytest.raises(UserError, match="outside"):
        load_catalog(csv, images_root=moved)
    with pytest.raises(UserError, match="images-root.*not a folder"):
        load_catalog(path, images_root=tmp_path / "nope")


def _exactly_24_of_40() -> pd.DataFrame:
    """One galaxy with 24 of 40 smooth votes, its fraction stored as float32 (0.6000000238)."""
    df = counted_votes(3, seed=4)
    root = "smooth-or-featured"
    df.loc[0, [count_col(root, "smooth"), count_col(root, "featured-or-disk"),
               count_col(root, "artifact"), votes_col(root)]] = [24, 16, 0, 40]
    df.loc[0, col(root, "smooth")] = np.float32(24 / 40)
    df.loc[0, col(root, "featured-or-disk")] = np.float32(16 / 40)
    df.loc[0, col(root, "artifact")] = np.float32(0)
    return df


def test_float32_fractions_reference_keeps_the_notebook_tree_counts(tmp_path):
    """float32(0.6) > 0.6: from the stored fraction the galaxy is elliptical (what the
    notebook did, kept by the reference rules); the tree rules decide from 24/40 = 0.6 exactly,
    not elliptical, in the catalogue's fractions (so selection agrees) and from a raw row."""
    from galaxy_llava.rules import morphology_from_fractions

    df = _exactly_24_of_40()
    smooth = col("smooth-or-featured", "smooth")
    assert float(df.loc[0, smooth]) > 0.6  # the trap itself
    write_hub_parquet(df, images_for(df), tmp_path, shards=1)
    ref, tree = load_catalog(tmp_path), load_catalog(tmp_path, rules="tree")
    assert ref.votes.loc[0, smooth] > 0.6 and tree.votes.loc[0, smooth] == 0.6
    row = df.iloc[0].to_dict()
    assert morphology_from_fractions(row, "reference").type == "elliptical"
    assert morphology_from_fractions(ref.votes.iloc[0], "reference").type == "elliptical"
    assert morphology_from_fractions(row, "tree").type != "elliptical"
    assert morphology_from_fractions(tree.votes.iloc[0], "tree").type != "elliptical"
    # without counts the tree rules can only read the stored fraction
    no_counts = {k: v for k, v in row.items() if not k.endswith(("_smooth", "_featured-or-disk",
                                                                  "_artifact"))}
    assert morphology_from_fractions(no_counts, "tree").type == "elliptical"
