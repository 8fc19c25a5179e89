"""Synthetic GZ2 catalogue: determinism, Hub schema, truth <-> caption agreement, bad input."""

from __future__ import annotations

import functools
import json
import math
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from galaxy_llava import gz2
from galaxy_llava.errors import UserError
from galaxy_llava.gz2 import QUESTIONS, col, count_col, votes_col
from galaxy_llava.morphology import ATTRIBUTES, Morphology
from galaxy_llava.rules import RULE_SETS, morphology_from_fractions
from galaxy_llava.toy.synthetic import (MIN_IMAGE_SIZE, TRUTH_MIX, draw_truth, render, synthesize,
                                        truth_morphology)
from galaxy_llava.toy.votes import (clarity, picture_measures, simulate_votes, true_answers,
                                   unanimous_votes)


def _frame(folder) -> pd.DataFrame:
    return pd.read_parquet(sorted((folder / "data").glob("train-*.parquet")))


@functools.lru_cache(maxsize=1)
def _truth_and_votes(n: int, seed: int = 7):
    """Truths and votes as the catalogue draws them; the pictures the votes depend on are
    rendered at the smallest size (what the votes read of them does not depend on it)."""
    out = []
    for i in range(n):
        truth = draw_truth(np.random.default_rng([seed, i, 0]))
        render(truth, np.random.default_rng([seed, i, 1]), MIN_IMAGE_SIZE)
        out.append((truth, simulate_votes(truth, np.random.default_rng([seed, i, 2]))))
    return out


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    a = synthesize(tmp_path / "a", n=6, seed=3, image_size=64, shard_rows=4)
    b = synthesize(tmp_path / "b", n=6, seed=3, image_size=64, shard_rows=4)
    c = synthesize(tmp_path / "c", n=6, seed=4, image_size=64, shard_rows=4)
    assert [p.name for p in a] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert a[0].read_bytes() != c[0].read_bytes()


def test_worker_pool_gives_the_same_bytes(tmp_path):
    one = synthesize(tmp_path / "one", n=4, seed=5, image_size=48, workers=1)
    two = synthesize(tmp_path / "two", n=4, seed=5, image_size=48, workers=2)
    assert one[0].read_bytes() == two[0].read_bytes()


def test_rerun_with_fewer_shards_removes_stale_ones(tmp_path):
    synthesize(tmp_path, n=5, seed=0, image_size=32, shard_rows=2)
    assert len(list((tmp_path / "data").glob("*.parquet"))) == 3
    with pytest.raises(UserError, match="holds a different catalogue: n 5 -> 2.*--overwrite"):
        synthesize(tmp_path, n=2, seed=0, image_size=32, shard_rows=2)
    paths = synthesize(tmp_path, n=2, seed=0, image_size=32, shard_rows=2, overwrite=True)
    assert sorted((tmp_path / "data").glob("*.parquet")) == paths
    assert not list((tmp_path / "data").glob(".*"))  # no temporary files left behind
    assert not list(tmp_path.parent.glob(f".{tmp_path.name}.*"))


def test_every_gz2_column_present_with_consistent_counts_and_fractions(synth_dir):
    df = _frame(synth_dir)
    assert len(df) == 48 and df["id_str"].is_unique
    assert df["id_str"].iloc[0] == "synth-1-0"
    for q, answers in QUESTIONS.items():
        total = df[votes_col(q)]
        counts = df[[count_col(q, a) for a in answers]]
        fractions = df[[col(q, a) for a in answers]]
        assert (counts.sum(axis=1) == total).all(), q
        asked = total > 0
        assert np.allclose(fractions[asked].sum(axis=1), 1.0), q
        assert fractions[~asked].isna().all().all(), q
        assert not fractions[asked].isna().any().any(), q
    first = df["smooth-or-featured-gz2_total-votes"]
    assert first.between(38, 52).all()
    # Each question reaches exactly the volunteers whose answers open it (the gz2 tree).
    for q in QUESTIONS:
        if q != gz2.ROOT:
            reached = sum(df[count_col(p, a)] for p, a in gz2.reached_by(q))
            assert (df[votes_col(q)] == reached).all(), q
    # Later questions only reach volunteers who took that branch, so counts shrink.
    assert (df["bar-gz2_total-votes"] <= first).all()
    assert (df["spiral-arm-count-gz2_total-votes"] <= df["has-spiral-arms-gz2_total-votes"]).all()
    assert (df["bar-gz2_total-votes"] == 0).any()  # some branch nobody reached
    truth = json.loads(df["synthetic_truth"].iloc[0])
    assert {"type", "shape", "bar", "arms", "bulge", "boxy", "disturbed", "render"} <= set(truth)


def test_loads_with_datasets_and_decodes_images(synth_dir, tmp_path):
    import datasets
    from PIL import Image

    ds = datasets.load_dataset("parquet", data_files=str(synth_dir / "data" / "*.parquet"),
                               split="train", cache_dir=str(tmp_path / "cache"))
    assert isinstance(ds.features["image"], datasets.Image)
    row = ds[0]
    assert isinstance(row["image"], Image.Image)
    assert row["image"].size == (128, 128) and row["image"].mode == "RGB"
    assert row["id_str"] == "synth-1-0"
    assert ds.with_format(None).cast_column("image", datasets.Image(decode=False))[0]["image"][
        "path"] == "synth-1-0.jpg"


def test_reference_and_tree_captions_follow_the_drawn_truth():
    rows = _truth_and_votes(1000)
    for rules, full_min in (("reference", 0.85), ("tree", 0.95)):
        type_ok = full_ok = 0
        for truth, votes in rows:
            got, want = morphology_from_fractions(votes, rules), truth_morphology(truth, rules)
            type_ok += got.type == want.type
            full_ok += got == want
        assert type_ok / len(rows) > 0.97, rules
        assert full_ok / len(rows) > full_min, (rules, full_ok / len(rows))


def _expected_truth_morphology(truth: dict, rules: str):
    """What each rule set should say of a truth, written out by hand (an independent oracle)."""
    kind, d = truth["type"], truth["disturbed"]
    if kind == "elliptical":
        return Morphology("elliptical", shape=truth["shape"], disturbed=d)
    if kind == "spiral":
        return Morphology("spiral", bar=truth["bar"], arms=truth["arms"],
                          prominent_bulge=truth["bulge"] == "obvious", disturbed=d)
    if rules == "reference":  # the notebook's rules call everything not smooth a spiral
        return Morphology("spiral", boxy_bulge=truth["boxy"], disturbed=d)
    if kind == "edge-on disk":
        return Morphology("edge-on disk", boxy_bulge=truth["boxy"], disturbed=d)
    return Morphology("artifact")


@pytest.mark.parametrize("rules", ["reference", "tree"])
def test_truth_morphology_is_the_rule_set_on_unanimous_votes(rules):
    reachable = set(RULE_SETS[rules].reachable())
    for i in range(1500):
        truth = draw_truth(np.random.default_rng([11, i, 0]))
        got = truth_morphology(truth, rules)
        assert got == _expected_truth_morphology(truth, rules), truth
        assert got in reachable


def test_unanimous_votes_walk_only_the_galaxy_s_branch():
    truth = draw_truth(np.random.default_rng(0))
    truth.update(type="edge-on disk", shape=None, bulge="obvious", boxy=True, bar=False,
                 arms=None, winding=None, artifact=None, disturbed=False)
    votes = unanimous_votes(truth, n_volunteers=40)
    asked = {q for q in QUESTIONS if votes[votes_col(q)]}
    assert asked == {"smooth-or-featured", "disk-edge-on", "bulge-shape", "something-odd"}
    assert all(votes[votes_col(q)] == 40 for q in asked)
    assert votes[col("disk-edge-on", "yes")] == votes[col("bulge-shape", "boxy")] == 1.0
    assert math.isnan(votes[col("bar", "yes")])
    truth.update(type="artifact", artifact="star")
    votes = unanimous_votes(truth)
    assert {q for q in QUESTIONS if votes[votes_col(q)]} == {gz2.ROOT}  # an artifact ends it


def test_stray_votes_exist_so_min_votes_matters():
    """Ellipticals get a few off-branch votes; reference rules sometimes read them, tree never."""
    strays, polluted, tree_right = 0, 0, []
    for truth, votes in _truth_and_votes(1000):
        if truth["type"] != "elliptical":
            continue
        strays += 0 < votes["bulge-size-gz2_total-votes"] < 5
        ref = morphology_from_fractions(votes, "reference")
        if ref.prominent_bulge or ref.boxy_bulge:
            polluted += 1
            tree = morphology_from_fractions(votes, "tree", min_votes=5)
            tree_right.append(tree == truth_morphology(truth, "tree"))
    assert strays > 50
    assert 0 < polluted < 0.15 * strays
    assert np.mean(tree_right) > 0.9


def test_rendered_catalogue_agrees_with_truth(synth_dir):
    df = _frame(synth_dir)
    agree = [morphology_from_fractions(r, "tree") == truth_morphology(json.loads(r["synthetic_truth"]),
                                                                       "tree")
             for _, r in df.iterrows()]
    assert np.mean(agree) > 0.85


def test_class_mix_follows_truth_mix():
    truths = [draw_truth(np.random.default_rng([7, i, 0])) for i in range(2000)]
    types = Counter(t["type"] for t in truths)
    for kind, share in TRUTH_MIX["type"].items():
        assert abs(types[kind] / len(truths) - share) < 0.04, kind
    spirals = [t for t in truths if t["type"] == "spiral"]
    assert {t["arms"] for t in spirals} == {None, "2", "3", "many"}
    assert 0.2 < np.mean([t["bar"] for t in spirals]) < 0.4
    assert {t["shape"] for t in truths if t["type"] == "elliptical"} == {"round", "in-between", "cigar"}
    assert 0.07 < np.mean([t["disturbed"] for t in truths]) < 0.13
    assert {t["disturbance"] for t in truths} == {None, "companion", "tidal"}
    assert any(t["boxy"] for t in truths) and {t["artifact"] for t in truths} == {None, "star", "trail"}
    every = {truth_morphology(t, "tree").type for t in truths}
    assert every == {"elliptical", "spiral", "edge-on disk", "artifact"}
    assert set(ATTRIBUTES) == set(truth_morphology(truths[0]).to_dict())


def test_ellipticals_are_redder_than_spiral_disks(synth_dir):
    """Bulges and ellipticals are redder than disks (i->R, g->B), as in SDSS images."""
    import io

    from PIL import Image

    df = _frame(synth_dir)
    colour = {"elliptical": [], "spiral": []}
    for _, row in df.iterrows():
        kind = json.loads(row["synthetic_truth"])["type"]
        if kind in colour:
            rgb = np.asarray(Image.open(io.BytesIO(row["image"]["bytes"])), float)
            bright = rgb.sum(axis=2) > np.percentile(rgb.sum(axis=2), 90)
            colour[kind].append(np.mean(rgb[bright, 0] - rgb[bright, 2]))
    assert colour["elliptical"] and colour["spiral"]
    assert np.mean(colour["elliptical"]) > np.mean(colour["spiral"]) + 10


@pytest.mark.parametrize("kwargs", [
    {"n": 0}, {"n": -3}, {"n": 2.5}, {"n": 4, "image_size": 16}, {"n": 4, "seed": -1},
    {"n": 4, "shard_rows": 0}, {"n": 4, "image_size": 10_000},
])
def test_bad_input_is_one_line_user_error(tmp_path, kwargs):
    with pytest.raises(UserError) as err:
        synthesize(tmp_path, **kwargs)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "data").exists()


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    from galaxy_llava.cli import main

    assert main(["synth", "--out", str(tmp_path), "--n", "0"]) == 2
    err = capsys.readouterr().err
    assert "n must be" in err and "Traceback" not in err


def test_question_nobody_reached_has_zero_votes_and_nan_fractions():
    truth = draw_truth(np.random.default_rng(0))
    truth.update(type="elliptical", shape="round", axis_ratio=0.9)
    render(truth, np.random.default_rng(0), MIN_IMAGE_SIZE)
    empty = 0
    for seed in range(20):
        votes = simulate_votes(truth, np.random.default_rng(seed))
        assert votes["smooth-or-featured-gz2_smooth_fraction"] > 0.6
        for q, answers in QUESTIONS.items():
            if votes[votes_col(q)] == 0:
                empty += 1
                assert all(math.isnan(votes[col(q, a)]) for a in answers)
    assert empty > 0


# ----------------------------------------------------------------- votes that depend on the picture


def _spiral(seed: int = 3) -> dict:
    """A barred two-armed spiral with an obvious bulge, rendered (its picture sets its votes)."""
    truth = draw_truth(np.random.default_rng(0))
    truth.update(type="spiral", shape=None, bar=True, arms="2", bulge="obvious", boxy=False,
                 winding="medium", artifact=None, disturbed=False, disturbance=None,
                 axis_ratio=0.95)
    render(truth, np.random.default_rng(seed), MIN_IMAGE_SIZE)
    return truth


def _true_share(truth: dict, seeds=range(200)) -> float:
    """The mean share of votes that went to the true answer, over the questions of the
    galaxy's branch (those most volunteers reached) and over ``seeds`` vote draws."""
    true = true_answers(truth)
    shares = []
    for seed in seeds:
        votes = simulate_votes(truth, np.random.default_rng(seed))
        total = votes[votes_col(gz2.ROOT)]
        shares += [votes[col(q, true[q])] for q in QUESTIONS if votes[votes_col(q)] > total / 2]
    return float(np.mean(shares))


def test_votes_are_a_function_of_the_rendered_picture_per_seed():
    a, b = _spiral(seed=3), _spiral(seed=3)
    assert a["render"] == b["render"] and clarity(a) == clarity(b)
    assert simulate_votes(a, np.random.default_rng(1)) == simulate_votes(b, np.random.default_rng(1))
    other = _spiral(seed=4)
    assert clarity(other) != clarity(a)  # another picture, another clarity
    del a["render"]
    with pytest.raises(ValueError, match="render the galaxy first"):
        simulate_votes(a, np.random.default_rng(1))


def _scale(**factors):
    def change(truth):
        for key, f in factors.items():
            if key == "axis_ratio":
                truth[key] *= f
            else:
                truth["render"][key] *= f
    return change


# Each change alters one thing a volunteer sees and keeps the others (a smaller galaxy keeps its
# surface brightness, so its flux shrinks with its area; so does a more inclined one's).
@pytest.mark.parametrize("what, measure, change", [
    ("fainter", "snr", _scale(flux=1 / 4)),
    ("noisier", "snr", _scale(sky_sigma=4)),
    ("smaller", "resolution", _scale(radius=1 / 3, flux=1 / 9)),
    ("worse seeing", "resolution", _scale(psf_fwhm=4)),
    ("more inclined", "axis_ratio", _scale(axis_ratio=0.5, flux=0.5)),
])
def test_harder_pictures_split_the_votes_more(what, measure, change):
    """Everything else fixed (truth, the other measures, the vote draws), a fainter, noisier,
    smaller, worse-seen or more inclined galaxy is less clear, and fewer volunteers give the
    true answers."""
    clear = _spiral()
    hard = json.loads(json.dumps(clear))
    change(hard)
    before, after = picture_measures(clear), picture_measures(hard)
    assert [k for k in before if not math.isclose(before[k], after[k])] == [measure]
    assert after[measure] < before[measure]
    assert clarity(hard) < clarity(clear) - 0.02, what
    assert _true_share(hard) < _true_share(clear) - 0.01, what


def test_edge_on_disks_and_faint_spirals_are_less_clear_than_bright_ellipticals():
    """Over the catalogue's mix: the types the picture makes hard get lower clarity."""
    by_type: dict[str, list[float]] = {}
    for truth, _ in _truth_and_votes(1000):
        by_type.setdefault(truth["type"], []).append(clarity(truth))
    mean = {t: np.mean(c) for t, c in by_type.items()}
    assert mean["edge-on disk"] < mean["elliptical"] and mean["spiral"] < mean["elliptical"]
    assert 0.8 < np.mean([c for cs in by_type.values() for c in cs]) < 0.88
