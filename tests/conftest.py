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
    from galaxy_llava.toy.synthetic import synthesize

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
    from galaxy_llava.toy.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", preset="tiny", seed=0)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (request with ``pytestmark = pytest.mark.usefixtures(...)``):
    the tiny model's matrices are small, extra threads only contend (20x slower on busy CPUs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------- the tiny model's pieces

_CAPTION = "This is an image of a spiral galaxy, with two arms."


def _noise_image(seed: int = 0, size: int = 72):
    """A random RGB image (``size`` x ``size``), deterministic for the seed."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def tiny_processor(tiny_model_dir):
    """The tiny model's processor as ``load_model`` returns it (do not modify: shared)."""
    from galaxy_llava.models.loading import load_model

    return load_model(tiny_model_dir)[1]


@pytest.fixture(scope="session")
def family(tiny_model_dir):
    """The model family of the tiny model, picked from its config."""
    from galaxy_llava.models.registry import family_for
    from galaxy_llava.models.loading import load_config

    return family_for(load_config(str(tiny_model_dir)))


@pytest.fixture
def tiny_batch(tiny_processor, family):
    """Collated model inputs (no labels) for two noise images with one caption; a fresh dict."""
    from galaxy_llava.models.encoding import encode_example
    from galaxy_llava.training.batches import Collator

    exs = [encode_example(tiny_processor, family, _noise_image(i), _CAPTION) for i in range(2)]
    collate = Collator(tiny_processor.tokenizer.pad_token_id, family=family,
                       processor=tiny_processor)
    batch = collate(exs)
    del batch["labels"], batch["label_mask"]
    return batch


@pytest.fixture(scope="session")
def lora_run(tiny_model_dir, tmp_path_factory):
    """A RUN folder holding a LoRA adapter with non-zero weights: (run, peft model in eval mode,
    processor, the run's prompt). Do not modify the files: copy the folder first."""
    from galaxy_llava.models.adapt import apply_lora
    from galaxy_llava.models.loading import load_model
    from galaxy_llava.saving import save_run_model

    model, processor = load_model(tiny_model_dir)
    peft_model = apply_lora(model)
    torch.manual_seed(3)
    with torch.no_grad():  # lora_B starts at zero: make the adapter change the outputs
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    run = tmp_path_factory.mktemp("runs") / "lora"
    prompt = "USER: <image>\nWhat galaxy is this?\nASSISTANT:"
    save_run_model(peft_model, processor, run, prompt=prompt, base_model=str(tiny_model_dir))
    return run, peft_model.eval(), processor, prompt



@pytest.fixture(scope="session")
def make_trainable():
    """``make(model_dir, method) -> (model, processor)``: the model in train mode with its
    encoder frozen; for ``lora``, adapters (r=4, no dropout) whose B is non-zero so they count."""
    def make(model_dir, method):
        from galaxy_llava.models.adapt import apply_lora, freeze_vision_encoder
        from galaxy_llava.models.loading import load_model

        model, processor = load_model(model_dir, device="cpu", dtype=torch.float32)
        freeze_vision_encoder(model)
        if method == "lora":
            model = apply_lora(model, r=4, alpha=8, dropout=0.0)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.normal_(0, 0.05)
        return model.train(), processor
    return make


@pytest.fixture(scope="session")
def teach():
    """``teach(model, processor, [(image, caption), ...])``: full-train until each image gets
    its caption (loss < 0.05 in 150 AdamW steps); returns the model in eval mode."""
    def run(model, processor, pairs):
        from galaxy_llava.models.encoding import encode_example
        from galaxy_llava.models.registry import family_for
        from galaxy_llava.training.batches import Collator

        torch.manual_seed(0)
        family = family_for(model)
        batch = Collator(processor.tokenizer.pad_token_id, family=family, processor=processor)(
            [encode_example(processor, family, image, caption) for image, caption in pairs])
        batch.pop("label_mask")
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(150):
            loss = model(**batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert loss.item() < 0.05
        return model.eval()
    return run


@pytest.fixture
def moved_lora_run(lora_run, tmp_path):
    """A copy of ``lora_run`` whose markers name a base model folder that no longer exists."""
    import json
    import shutil

    run = tmp_path / "moved-run"
    shutil.copytree(lora_run[0], run)
    for marker in (run / "galaxy_llava.json", run / "adapter" / "galaxy_llava.json"):
        data = json.loads(marker.read_text())
        data["base_model"] = str(tmp_path / "deleted-base")
        marker.write_text(json.dumps(data))
    return run


@pytest.fixture
def no_patch_model_dir(tiny_model_dir, tmp_path):
    """A copy of the tiny model whose processor ships without patch_size, as TinyLLaVA's does."""
    import json
    import shutil

    folder = tmp_path / "no-patch"
    shutil.copytree(tiny_model_dir, folder)
    cfg_path = folder / "processor_config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in ("patch_size", "num_additional_image_tokens", "vision_feature_select_strategy"):
        cfg.pop(key)
    cfg_path.write_text(json.dumps(cfg))
    return folder


def _find_chromium() -> str | None:
    import shutil
    from pathlib import Path
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path and Path(path).exists():
            return path
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


def require_for_browser_tests(what: str, hint: str) -> None:
    """Skip a browser test whose tool is missing, or fail it under CI=true.

    CI installs Chromium and playwright itself (.ci/run, the lock file), so a missing one there is
    a broken install that a skip would hide.
    """
    message = f"{what} is not installed ({hint})"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message + "; CI=true, so this fails instead of skipping")
    pytest.skip(message)


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of a headless-capable Chromium (skip here, fail under CI=true, when there is none)."""
    path = _find_chromium()
    if path is None:
        require_for_browser_tests("chromium", "apt-get install -y chromium")
    return path


def loaded_by(modules: str | tuple[str, ...], candidates: tuple[str, ...]) -> list[str]:
    """Which of ``candidates`` (modules such as torch) a fresh interpreter has loaded after
    importing ``modules`` (the test session itself has torch loaded): how the tests hold a
    light module light."""
    import subprocess
    import sys

    names = ", ".join([modules] if isinstance(modules, str) else modules)
    code = (f"import sys, {names}; "
            f"print(' '.join(m for m in {candidates!r} if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()
