"""Shared fixtures: a few dozen synthetic galaxies, a prepared dataset and a tiny model, built once."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

# The tiny model's ops are too small to split across threads: on 2 shared cores a second thread
# makes each step ~10x slower through contention.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """48 synthetic galaxies (GZ2 schema, Hub parquet layout), small images for speed."""
    from galaxy_llava.synthetic import synthesize

    out = tmp_path_factory.mktemp("synth")
    synthesize(out, n=48, seed=1, image_size=128)
    return out


@pytest.fixture(scope="session")
def prepared_dir(synth_dir, tmp_path_factory):
    """A prepared dataset (12 per class, 64 px images) from the synthetic catalogue."""
    from galaxy_llava.prepare import prepare

    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare(synth_dir, out, n_per_class=12, seed=0, image_size=64,
            val_fraction=0.2, test_fraction=0.2, workers=1)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random-initialised tiny LLaVA saved in the Hugging Face layout."""
    from galaxy_llava.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", preset="tiny", seed=0)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (request with ``pytestmark = pytest.mark.usefixtures(...)``):
    the tiny model's matrices are small, extra threads only contend (20x slower on busy CPUs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
