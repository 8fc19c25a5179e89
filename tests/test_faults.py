"""The fault and bad-input contract, through the real CLI (``python -m galaxy_llava``).

* A catalogue of bad inputs, in the issue's families: each exits with code 2, prints one line
  naming the problem and no traceback, and leaves its working folder byte-for-byte as it was.
* A run that succeeds removes what interrupted runs left behind.
* kill -9 at a random (seeded) moment of ``prepare`` and ``train`` (also inside a checkpoint
  write), then a re-run: the result is the uninterrupted run's, and no temporary file remains.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from galaxy_llava.cli import main as cli_main
from galaxy_llava.io import is_temporary
from galaxy_llava.training import run_folder

ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
           MPLBACKEND="Agg")
# The kill tests' run; the reference run below is this, uninterrupted. LoRA dropout makes the
# RNG state part of what a resume must restore.
TRAIN = ["--method", "lora", "--num_train_epochs", "3", "--per_device_train_batch_size", "4",
         "--learning_rate", "3e-3", "--logging_steps", "1", "--lora_dropout", "0.1",
         "--seed", "0"]


def galaxy_llava(*args, cwd, env=None, **kw) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh process."""
    return subprocess.run([sys.executable, "-m", "galaxy_llava", *map(str, args)], cwd=cwd,
                          env=env or ENV, capture_output=True, text=True, timeout=600, **kw)


_HASHES: dict[tuple, str] = {}


def tree(folder: Path) -> dict[str, str]:
    """{relative path: sha256 of the bytes, "dir" or "-> link"} of everything under ``folder``,
    hidden files included (a hash is reused while a file's inode, size and times are)."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(root) / name
            rel = str(p.relative_to(folder))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                st = p.stat()
                key = (str(p), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                if key not in _HASHES:
                    _HASHES[key] = hashlib.sha256(p.read_bytes()).hexdigest()
                out[rel] = _HASHES[key]
    return out


def leftovers(folder: Path) -> list[str]:
    """Temporary files and folders of interrupted writes anywhere under ``folder``."""
    found = []
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            if is_temporary(name) or name in (run_folder.BACKUP, run_folder.NEXT,
                                              run_folder.REPLACED, ".adapter.partial",
                                              ".model.partial"):
                found.append(str(Path(root, name).relative_to(folder)))
    return found


# ----------------------------------------------------------------- the world the cases act on


@pytest.fixture(scope="module")
def reference_run(tiny_model_dir, prepared_dir, tmp_path_factory):
    """The kill tests' run, uninterrupted (a LoRA RUN with its last checkpoint)."""
    run = tmp_path_factory.mktemp("faults") / "run"
    args = ["train", *TRAIN, "--model", tiny_model_dir, "--data", prepared_dir, "--output_dir", run]
    assert cli_main([str(a) for a in args]) == 0
    return run


@pytest.fixture(scope="module")
def world(tiny_model_dir, prepared_dir, synth_dir, reference_run, tmp_path_factory):
    """A working folder with one of each output (dataset, model, EVAL, report, run), a foreign
    folder and a plain file; the cases add their own inputs to it."""
    from galaxy_llava.evaluate import majority_baseline
    from galaxy_llava.report import build_report

    w = tmp_path_factory.mktemp("world")
    shutil.copytree(prepared_dir, w / "data")
    shutil.copytree(tiny_model_dir, w / "model")
    shutil.copytree(reference_run, w / "run")
    majority_baseline(w / "data", "test", w / "eval")
    build_report([w / "eval"], w / "report.html")
    (w / "notes").mkdir()
    (w / "notes" / "notes.txt").write_text("mine")
    (w / "file.txt").write_text("mine")
    shutil.copy(next((w / "data" / "images").iterdir()), w / "x.jpg")  # outside any dataset
    hub = tmp_path_factory.mktemp("hf-cache")  # outside the world: the Hub library writes there
    snap = hub / "models--fake-org--tiny-llava" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps({"model_type": "tiny_llava"}))
    (hub / "models--fake-org--tiny-llava" / "refs").mkdir()
    (hub / "models--fake-org--tiny-llava" / "refs" / "main").write_text("0" * 40)
    return {"w": w, "synth": synth_dir, "hub": hub}


def _records(w: Path) -> list[dict]:
    return [json.loads(x) for x in (w / "data" / "dataset.jsonl").read_text().splitlines()]


def _dataset(w: Path, name: str, change) -> None:
    """A copy of the prepared dataset whose second record ``change`` edits (raw text allowed)."""
    folder = w / name
    if folder.exists():
        return
    shutil.copytree(w / "data", folder)
    lines = [json.dumps(r) for r in _records(w)]
    lines[1] = change(json.loads(lines[1]))
    (folder / "dataset.jsonl").write_text("\n".join(
        x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")


def _copy(w: Path, src: str, dst: str) -> Path:
    if not (w / dst).exists():
        shutil.copytree(w / src, w / dst)
    return w / dst


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def _catalogue(w: Path, name: str, payload) -> None:
    """A Hub-layout parquet catalogue whose image column holds ``payload(i)``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from test_gz2_catalog import make_votes

    if (w / name).exists():
        return
    df = make_votes(12, seed=4)
    (w / name / "data").mkdir(parents=True)
    table = pa.Table.from_pandas(df, preserve_index=False)
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = table.add_column(0, "image", pa.array([payload(i) for i in range(len(df))], image))
    pq.write_table(table, w / name / "data" / "train-00000-of-00001.parquet")


def _csv_outside(w: Path) -> None:
    from test_gz2_catalog import make_votes

    if (w / "csvcat").exists():
        return
    (w / "csvcat").mkdir()
    make_votes(12, seed=5).assign(file_loc=str(w / "x.jpg")).to_csv(w / "csvcat" / "gz2.csv",
                                                                    index=False)


def _repo(w: Path) -> None:
    from test_layouts import write_repo

    if not (w / "repo").exists():
        (w / "repo").mkdir()
        write_repo(w / "repo")


def _tiny_llava(w: Path) -> None:
    folder = w / "tinyllava"
    if not folder.exists():
        shutil.copytree(w / "model", folder)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "model_type": "tiny_llava"}))


def _broken_model(w: Path) -> None:
    if not (w / "broken-model").exists():
        _truncate(_copy(w, "model", "broken-model") / "model.safetensors")


def _broken_adapter(w: Path) -> None:
    if not (w / "broken-run").exists():
        _truncate(_copy(w, "run", "broken-run") / "adapter" / "adapter_model.safetensors", 0.9)


def _broken_optimizer(w: Path) -> None:
    if not (w / "badopt-run").exists():
        run = _copy(w, "run", "badopt-run")
        _truncate(run_folder.checkpoints(run)[-1] / "optimizer.pt", 0.7)


def _dead_start(w: Path) -> None:
    """What kill -9 leaves when it strikes before the first checkpoint is whole."""
    if not (w / "dead-run").exists():
        (w / "dead-run" / "checkpoint-4").mkdir(parents=True)
        shutil.copy(w / "run" / "config.yaml", w / "dead-run" / "config.yaml")
        (w / "dead-run" / "checkpoint-4" / "optimizer.pt").write_bytes(b"PK\x03\x04 cut")


def _random_optimizer(w: Path) -> None:
    """A LoRA run whose last checkpoint's optimizer.pt is random bytes (not a zip, not a
    pickle the weights-only loader takes)."""
    if not (w / "randopt-run").exists():
        run = _copy(w, "run", "randopt-run")
        optimizer = run_folder.checkpoints(run)[-1] / "optimizer.pt"
        optimizer.write_bytes(random.Random(0).randbytes(optimizer.stat().st_size))


def _full_run(w: Path) -> None:
    """A short full fine-tune (``full-run``) and a copy of its checkpoint (``full-ckpt``)."""
    if not (w / "full-run").exists():
        argv = ["train", "--method", "full", "--model", w / "model", "--data", w / "data",
                "--output_dir", w / "full-run", "--max_steps", "2", "--save_steps", "2",
                "--per_device_train_batch_size", "4", "--seed", "0"]
        assert cli_main([str(a) for a in argv]) == 0
        shutil.copytree(run_folder.checkpoints(w / "full-run")[-1], w / "full-ckpt")


def _linked_dataset(w: Path) -> None:
    """A copy of the dataset whose first image is a link to a file outside its folder."""
    if not (w / "linkdata").exists():
        shutil.copytree(w / "data", w / "linkdata")
        (w / "outside").mkdir(exist_ok=True)
        shutil.copy(w / "x.jpg", w / "outside" / "private.jpg")
        image = w / "linkdata" / _records(w)[0]["image"]
        image.unlink()
        image.symlink_to(os.path.relpath(w / "outside" / "private.jpg", image.parent))


def _linked_folder(w: Path) -> None:
    """A folder of images (one a link out of it) and a path list naming that link."""
    if not (w / "linkimages").exists():
        _linked_dataset(w)
        (w / "linkimages").mkdir()
        shutil.copy(w / "x.jpg", w / "linkimages" / "a.jpg")
        (w / "linkimages" / "b.jpg").symlink_to("../outside/private.jpg")
        (w / "linkimages" / "list.csv").write_text("file_loc\nb.jpg\n")


def _leftover(w: Path, rel: str) -> None:
    (w / rel).parent.mkdir(parents=True, exist_ok=True)
    (w / rel).write_text("half")


SYNTH = "{synth}"  # replaced by the synthetic catalogue's path
PREP = ["--n-per-class", "3", "--image-size", "32", "--workers", "1"]
E = ["--model", "model", "--data", "data"]

# (family, id, argv, setup(w) or None, the message's regex, extra environment)
CASES = [
    # 1. --out never destroys what is there
    ("clobber", "report-out-is-a-folder", ["report", "eval", "--out", "data"], None,
     "--out data is a folder; a report is one file"),
    ("clobber", "report-out-is-another-file",
     ["report", "eval", "--out", "data/dataset.jsonl", "--overwrite"], None,
     "holds a file, not an HTML report; refusing to replace it \\(even with --overwrite\\)"),
    ("clobber", "report-of-other-evals", ["report", "eval", "eval2", "--out", "report.html"],
     lambda w: _copy(w, "eval", "eval2"), "holds a different report: .*pass --overwrite"),
    ("clobber", "export-onto-a-dataset", ["export", "--run", "run", "--out", "data",
                                          "--overwrite"], None,
     "--out data holds a prepared dataset, not a model folder"),
    ("clobber", "tiny-model-onto-a-dataset", ["tiny-model", "--out", "data", "--overwrite"], None,
     "--out data holds a prepared dataset, not a model folder"),
    ("clobber", "evaluate-into-another-evaluation", ["evaluate", *E, "--out", "eval"], None,
     "--out eval holds a different evaluation: kind 'majority' -> 'vlm'"),
    ("clobber", "prepare-onto-a-model", ["prepare", "--source", SYNTH, "--out", "model",
                                         "--overwrite", *PREP], None,
     "--out model holds a model folder, not a prepared dataset"),
    ("clobber", "synth-onto-a-dataset", ["synth", "--out", "data", "--n", "4", "--overwrite"],
     None, "--out data holds a prepared dataset, not a synthetic catalogue"),
    ("clobber", "probe-out-is-a-file", ["probe", *E, "--out", "file.txt"], None,
     "--out file.txt is a file, not a folder"),
    ("clobber", "train-onto-a-dataset", ["train", *E, "--method", "lora", "--output_dir", "data",
                                         "--overwrite_output_dir"], None,
     "--output_dir data holds a prepared dataset, not a training run"),
    ("clobber", "prepare-into-someones-folder", ["prepare", "--source", SYNTH, "--out", "notes",
                                                 "--overwrite", *PREP], None,
     "--out notes is not empty and holds no manifest.json"),
    ("clobber", "tiny-model-onto-another-model", ["tiny-model", "--out", "model", "--seed", "5"],
     None, "--out model holds a different model: seed 0 -> 5; pass --overwrite"),
    ("clobber", "prepare-onto-another-dataset",
     ["prepare", "--source", SYNTH, "--out", "data", "--seed", "3", "--n-per-class", "12"], None,
     "--out data holds a different dataset: .*seed 0 -> 3"),
    # 2. a command that fails leaves its output as it was (nothing new, nothing removed)
    ("unchanged", "prepare-unreadable-images-new-out",
     ["prepare", "--source", "badcat", "--out", "newdata", *PREP],
     lambda w: _catalogue(w, "badcat", lambda i: {"bytes": b"not a jpeg", "path": None}),
     "none of the \\d+ selected images could be read"),
    ("unchanged", "prepare-overwrite-that-fails-keeps-the-dataset",
     ["prepare", "--source", "badcat", "--out", "data", "--overwrite", *PREP],
     lambda w: _catalogue(w, "badcat", lambda i: {"bytes": b"not a jpeg", "path": None}),
     "none of the \\d+ selected images could be read"),
    ("unchanged", "evaluate-overwrite-that-fails-keeps-the-metrics",
     ["evaluate", "--model", "broken-model", "--data", "data", "--out", "eval", "--overwrite"],
     _broken_model, "model.safetensors is truncated or corrupt"),
    ("unchanged", "export-overwrite-that-fails-keeps-the-model",
     ["export", "--run", "data", "--out", "model", "--overwrite"], None,
     "data is not a galaxy-llava run"),
    ("unchanged", "report-overwrite-that-fails-keeps-the-report",
     ["report", "unfinished", "--out", "report.html", "--overwrite"],
     lambda w: (_copy(w, "eval", "unfinished") / "metrics.json").unlink(missing_ok=True),
     "EVAL folder unfinished has no metrics.json"),
    ("unchanged", "tiny-model-bad-steps-makes-nothing",
     ["tiny-model", "--out", "newmodel", "--pretrain-steps", "-1"], None,
     "--pretrain-steps must be >= 0"),
    # a resume that cannot work is refused before anything changes (config.yaml included)
    ("unchanged", "resume-optimizer-of-random-bytes",
     ["train", "--output_dir", "randopt-run", "--resume_from_checkpoint", "last",
      "--num_train_epochs", "4"], _random_optimizer,
     "cannot resume from .*checkpoint-\\d+: optimizer.pt cannot be loaded"),
    ("unchanged", "resume-a-full-run-as-lora",
     ["train", "--output_dir", "full-run", "--resume_from_checkpoint", "last", "--method",
      "lora"], _full_run, "full-run/checkpoint-2 holds a full fine-tune, not a LoRA adapter; "
     "resume it with --method full"),
    ("unchanged", "new-lora-run-from-a-full-checkpoint",
     ["train", *E, "--method", "lora", "--output_dir", "newrun", "--resume_from_checkpoint",
      "full-ckpt"], _full_run, "full-ckpt holds a full fine-tune, not a LoRA adapter"),
    ("unchanged", "resume-a-lora-run-as-full",
     ["train", "--output_dir", "run", "--resume_from_checkpoint", "last", "--method", "full"],
     None, "run/checkpoint-\\d+ holds a LoRA adapter, not a full fine-tune; resume it with "
     "--method lora"),
    ("unchanged", "resume-a-lora-run-with-another-rank",
     ["train", "--output_dir", "run", "--resume_from_checkpoint", "last", "--lora_r", "4"],
     None, "cannot resume from .*checkpoint-\\d+: its adapter's .* has shape .* this run's"),
    # 3. leftovers of interrupted runs: a refused run touches nothing, leftovers included
    ("leftovers", "prepare-refused-keeps-its-leftovers",
     ["prepare", "--source", SYNTH, "--out", "data", "--seed", "9", *PREP],
     lambda w: _leftover(w, "data/images/.abc.jpg.k2j4h5g6.tmp"), "holds a different dataset"),
    ("leftovers", "report-refused-keeps-its-leftovers",
     ["report", "eval", "eval2", "--out", "report.html"],
     lambda w: (_copy(w, "eval", "eval2"), _leftover(w, ".report.html.abcd1234.tmp")),
     "holds a different report"),
    ("leftovers", "resume-a-killed-start-without-checkpoint",
     ["train", "--output_dir", "dead-run", "--resume_from_checkpoint", "last"], _dead_start,
     "dead-run has no checkpoint yet .* train again without --resume_from_checkpoint"),
    # 4. one line, never a traceback
    ("one-line", "record-image-is-null", ["evaluate", "--model", "model", "--data", "nullimage",
                                          "--out", "neweval"],
     lambda w: _dataset(w, "nullimage", lambda r: {**r, "image": None}),
     "dataset.jsonl:2: field 'image' must be a string"),
    ("one-line", "record-text-is-not-a-string",
     ["evaluate", "--model", "model", "--data", "numtext", "--out", "neweval"],
     lambda w: _dataset(w, "numtext", lambda r: {**r, "text": 42}),
     "dataset.jsonl:2: field 'text' must be a string"),
    ("one-line", "jsonl-is-not-text", ["evaluate", *E[:2], "--data", "binary", "--out", "neweval"],
     lambda w: (_dataset(w, "binary", lambda r: r),
                (w / "binary" / "dataset.jsonl").write_bytes(b"\xff\xfe\x00garbage")),
     "dataset.jsonl is not UTF-8 text"),
    ("one-line", "truncated-model-safetensors", ["describe", "--model", "broken-model",
                                                 "data/images"], _broken_model,
     "broken-model/model.safetensors is truncated or corrupt"),
    ("one-line", "truncated-adapter-safetensors",
     ["evaluate", "--model", "broken-run", "--data", "data", "--out", "neweval"],
     _broken_adapter, "adapter_model.safetensors is truncated or corrupt"),
    ("one-line", "truncated-optimizer-in-checkpoint",
     ["train", "--output_dir", "badopt-run", "--resume_from_checkpoint", "last"],
     _broken_optimizer, "checkpoint .* is damaged: .*optimizer.pt is truncated or corrupt"),
    ("one-line", "model-config-is-not-json", ["describe", "--model", "badconfig", "data/images"],
     lambda w: (_copy(w, "model", "badconfig") / "config.json").write_text("{oops"),
     "badconfig/config.json is not a readable JSON model config"),
    ("one-line", "evaluate-out-is-a-file", ["evaluate", *E, "--out", "file.txt"], None,
     "--out file.txt is a file, not a folder"),
    ("one-line", "tiny-model-negative-seed", ["tiny-model", "--out", "newmodel", "--seed", "-1"],
     None, "--seed must be in \\[0, 4294967296\\) \\(got -1\\)"),
    ("one-line", "synth-negative-seed", ["synth", "--out", "newsynth", "--n", "4", "--seed", "-1"],
     None, "seed must be an integer >= 0"),
    ("one-line", "disk-full-while-writing", ["prepare", "--source", SYNTH, "--out", "newdata",
                                             "--n-per-class", "12", "--image-size", "64"], None,
     "no room to write newdata: File too large .*left as it was"),
    # 5. no unbounded or non-finite number gets through
    ("numbers", "describe-max-new-tokens-huge", ["describe", "--model", "model", "data/images",
                                                 "--max-new-tokens", "100000000"], None,
     "--max-new-tokens 100000000 is more than model can generate: its context is 512 tokens"),
    ("numbers", "evaluate-max-new-tokens-huge", ["evaluate", *E, "--out", "neweval",
                                                 "--max-new-tokens", "100000000"], None,
     "--max-new-tokens 100000000 is more than model can generate"),
    ("numbers", "describe-batch-size-zero", ["describe", "--model", "model", "data/images",
                                             "--batch-size", "0"], None,
     "--batch-size must be >= 1"),
    ("numbers", "evaluate-num-beams-zero", ["evaluate", *E, "--out", "neweval", "--num-beams",
                                            "0"], None, "--num-beams must be >= 1"),
    ("numbers", "evaluate-limit-zero", ["evaluate", *E, "--out", "neweval", "--limit", "0"], None,
     "--limit must be at least 1"),
    ("numbers", "train-learning-rate-inf", ["train", *E, "--method", "lora", "--output_dir",
                                            "newrun", "--learning_rate", "inf"], None,
     "--learning_rate must be a finite number \\(got inf\\)"),
    ("numbers", "train-epochs-inf", ["train", *E, "--method", "lora", "--output_dir", "newrun",
                                     "--num_train_epochs", "inf"], None,
     "--num_train_epochs must be a finite number \\(got inf\\)"),
    ("numbers", "prepare-test-fraction-inf", ["prepare", "--source", SYNTH, "--out", "newdata",
                                              "--test-fraction", "inf"], None,
     "--test-fraction must be in \\[0, 1\\) \\(got inf\\)"),
    ("numbers", "prepare-val-fraction-nan", ["prepare", "--source", SYNTH, "--out", "newdata",
                                             "--val-fraction", "nan"], None,
     "--validation-fraction must be in \\[0, 1\\) \\(got nan\\)"),
    ("numbers", "synth-image-size-huge", ["synth", "--out", "newsynth", "--n", "4",
                                          "--image-size", "100000"], None,
     "image_size must be <= 4096"),
    # 6. images only from inside the data's own folder
    ("outside", "record-image-climbs-out", ["evaluate", *E[:2], "--data", "escape", "--out",
                                            "neweval"],
     lambda w: _dataset(w, "escape", lambda r: {**r, "image": "images/../../x.jpg"}),
     "escape/dataset.jsonl:2: image images/../../x.jpg is outside the folder .*"
     "--allow-outside-paths"),
    ("outside", "record-image-absolute-elsewhere",
     ["evaluate", *E[:2], "--data", "absolute", "--out", "neweval"],
     lambda w: _dataset(w, "absolute", lambda r: {**r, "image": str(w / "x.jpg")}),
     "absolute/dataset.jsonl:2: image /.*x.jpg is outside the folder"),
    ("outside", "probe-record-image-climbs-out",
     ["probe", *E[:2], "--data", "escape", "--out", "neweval"],
     lambda w: _dataset(w, "escape", lambda r: {**r, "image": "images/../../x.jpg"}),
     "is outside the folder"),
    ("outside", "csv-file-loc-absolute-elsewhere",
     ["prepare", "--source", "csvcat/gz2.csv", "--out", "newdata", *PREP], _csv_outside,
     "row 1 of .*gz2.csv: catalogue image /.*x.jpg is outside the catalogue's folder .*"
     "--allow-outside-paths \\(a CSV whose file_loc paths are absolute needs it\\)"),
    ("outside", "parquet-image-path-elsewhere",
     ["prepare", "--source", "pathcat", "--out", "newdata", *PREP],
     lambda w: _catalogue(w, "pathcat", lambda i: {"bytes": None, "path": str(w / "x.jpg")}),
     "catalogue image /.*x.jpg is outside the catalogue's folder"),
    ("outside", "record-image-links-out",
     ["train", *E[:2], "--data", "linkdata", "--method", "lora", "--output_dir", "newrun"],
     _linked_dataset, "linkdata/dataset.jsonl:1: image .* leads through a link to "
     ".*outside/private.jpg, outside the folder .*--allow-outside-paths"),
    ("outside", "catalogue-folder-image-links-out",
     ["catalogue", *E[:2], "--images", "linkimages", "--out", "newcat"], _linked_folder,
     "--images linkimages: image .*b.jpg leads through a link to .*outside/private.jpg, "
     "outside the folder"),
    ("outside", "catalogue-path-list-links-out",
     ["catalogue", *E[:2], "--images", "linkimages/list.csv", "--out", "newcat"],
     _linked_folder, "list.csv: image b.jpg leads through a link to .*outside/private.jpg"),
    # 7. real layouts: a whole dataset repository, a model type transformers lacks
    ("layouts", "repo-unknown-config", ["prepare", "--source", "repo", "--out", "newdata",
                                        "--hub-config", "nope", *PREP], _repo,
     "holds the dataset configs all, data, evo, tiny \\(data is the default\\); "
     "--hub-config 'nope' is none of them"),
    ("layouts", "repo-config-with-another-schema",
     ["prepare", "--source", "repo", "--out", "newdata", "--hub-config", "evo", *PREP], _repo,
     "evo/train-00000-of-00001.parquet: missing column"),
    ("layouts", "repo-config-without-the-split",
     ["prepare", "--source", "repo", "--out", "newdata", "--hub-config", "tiny",
      "--hub-split", "test", *PREP], _repo, "none of split 'test'; pass --hub-split train"),
    ("layouts", "describe-unsupported-model-type", ["describe", "--model", "tinyllava",
                                                    "data/images"], _tiny_llava,
     "unsupported model type 'tiny_llava' in tinyllava/config.json; supported: .*llava"),
    ("layouts", "evaluate-unsupported-model-type", ["evaluate", "--model", "tinyllava", "--data",
                                                    "data", "--out", "neweval"], _tiny_llava,
     "unsupported model type 'tiny_llava'"),
    ("layouts", "hub-cached-unsupported-model-type", ["describe", "--model", "fake-org/tiny-llava",
                                                      "data/images"], None,
     "unsupported model type 'tiny_llava' in fake-org/tiny-llava"),
]


def _fsize_limit():
    """A file size limit in the child: writes past 50 kB fail as on a full disk (EFBIG)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))  # the preview is larger


DISK_FULL = {"disk-full-while-writing"}


@pytest.mark.parametrize("case", [pytest.param(c, id=f"{c[0]}:{c[1]}") for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(world, case):
    family, name, argv, setup, message = case
    w = world["w"]
    if setup is not None:
        setup(w)
    argv = [a.replace(SYNTH, str(world["synth"])) for a in argv]
    env = dict(ENV, HF_HUB_CACHE=str(world["hub"]))
    before = tree(w)
    r = galaxy_llava(*argv, cwd=w, env=env,
                     preexec_fn=_fsize_limit if name in DISK_FULL else None)
    ours = [line for line in r.stderr.splitlines() if line.startswith("galaxy-llava ")]
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(ours) == 1, r.stderr[-2000:]
    assert re.search(message, ours[0]), ours[0]
    assert family != "layouts" or "offline" not in ours[0], ours[0]
    assert tree(w) == before, "the working folder changed"


def test_the_catalogue_covers_every_family():
    families = [c[0] for c in CASES]
    assert len(CASES) >= 40 and len({c[1] for c in CASES}) == len(CASES)
    assert all(families.count(f) >= 3 for f in set(families)) and len(set(families)) == 7


# ----------------------------------------------------------------- what goes right


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(monkeypatch, capsys,
                                                                      tmp_path):
    import galaxy_llava.toy.synthetic as synthetic

    def boom(*a, **k):
        raise RuntimeError("a bug\nwith a second line")

    monkeypatch.setattr(synthetic, "synthesize", boom)
    assert cli_main(["synth", "--out", str(tmp_path / "s"), "--n", "2"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert ("galaxy-llava synth: internal error: RuntimeError: a bug; run with --debug for the "
            "traceback") in err
    with pytest.raises(RuntimeError, match="a bug"):
        cli_main(["--debug", "synth", "--out", str(tmp_path / "s"), "--n", "2"])
    with pytest.raises(RuntimeError, match="a bug"):
        cli_main(["synth", "--out", str(tmp_path / "s"), "--n", "2", "--debug"])


def test_the_report_embeds_no_image_from_outside_its_folders(world, tmp_path):
    from galaxy_llava.report import build_report

    w = world["w"]
    ev = shutil.copytree(w / "eval", tmp_path / "eval")
    rows = [json.loads(x) for x in (ev / "predictions.jsonl").read_text().splitlines()]
    secret = tmp_path / "private" / "secret.jpg"
    secret.parent.mkdir()
    shutil.copy(w / "x.jpg", secret)
    rows[0]["image"] = str(secret)  # elsewhere on disk
    rows[1]["image"] = "../../private/secret.jpg"
    (ev / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    page = build_report([ev], tmp_path / "r.html").read_text()
    assert page.count("not embedded") == 2
    assert page.count("data:image/jpeg;base64,") == min(len(rows), 24) - 2  # the data's images


def test_a_run_started_with_relative_paths_resumes_from_another_folder(world, tmp_path,
                                                                       monkeypatch, capsys):
    """config.yaml kept ``data`` as typed, so a resume from elsewhere said 'data not found'."""
    w = tmp_path / "w"
    for name in ("data", "model"):
        shutil.copytree(world["w"] / name, w / name)
    monkeypatch.chdir(w)
    argv = ["train", *TRAIN, "--model", "model", "--data", "data", "--output_dir", "run",
            "--num_train_epochs", "1"]
    assert cli_main(argv) == 0
    steps = json.loads((w / "run" / "train_metrics.json").read_text())["steps"]
    (tmp_path / "b" / "deeper").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "b" / "deeper")
    capsys.readouterr()
    assert cli_main(["train", "--output_dir", "../../w/run", "--resume_from_checkpoint", "last",
                     "--num_train_epochs", "2"]) == 0, capsys.readouterr().err
    assert json.loads((w / "run" / "train_metrics.json").read_text())["steps"] == 2 * steps


@pytest.mark.parametrize("command", ["prepare", "report", "synth"])
def test_the_next_run_removes_leftovers_of_interrupted_ones(command, world, prepared_dir,
                                                            synth_dir, tmp_path):
    """Temporaries of atomic writes cut short (inside the output and beside it) go; a folder
    swap cut between its two renames is undone first."""
    if command == "prepare":
        out = tmp_path / "data"
        shutil.copytree(prepared_dir, tmp_path / ".data.old")  # the swap was cut: data missing
        argv = ["prepare", "--source", synth_dir, "--out", out, "--n-per-class", "12", "--seed",
                "0", "--image-size", "64", "--val-fraction", "0.2", "--test-fraction", "0.2",
                "--workers", "1"]
        junk = [tmp_path / ".data.old/images/.0a1b.jpg.abcdefgh.tmp/0a1b.jpg",
                tmp_path / ".data.old/.dataset.jsonl.abcdefgh.tmp/dataset.jsonl",
                tmp_path / ".data.k2j4h5g6.tmp/data/manifest.json"]
    elif command == "report":
        out = tmp_path / "report.html"
        ev = shutil.copytree(world["w"] / "eval", tmp_path / "eval")
        argv = ["report", ev, "--out", out]
        junk = [tmp_path / ".report.html.abcdefgh.tmp/report.html"]
    else:
        out = tmp_path / "synth"
        argv = ["synth", "--out", out, "--n", "2", "--image-size", "32"]
        junk = [tmp_path / ".synth.abcdefgh.tmp/synth/data/train-00000-of-00001.parquet"]
    for j in junk:
        j.parent.mkdir(parents=True, exist_ok=True)
        j.write_bytes(b"half")
    r = galaxy_llava(*argv, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert leftovers(tmp_path) == []
    if command == "prepare":
        assert tree(out) == tree(prepared_dir)
    r = galaxy_llava(*argv, cwd=tmp_path)  # the same command again: its own output, no refusal
    assert r.returncode == 0, r.stderr[-2000:]


def test_train_overwrite_that_fails_keeps_the_previous_run(world, tmp_path, capsys):
    run = shutil.copytree(world["w"] / "run", tmp_path / "run")
    before = tree(tmp_path)
    argv = ["train", *TRAIN, "--model", world["w"] / "model", "--data", world["w"] / "data",
            "--output_dir", run, "--overwrite_output_dir", "--max_steps", "1", "--push_to_hub"]
    assert cli_main([str(a) for a in argv]) == 2  # fails inside the Trainer: Hub offline
    assert "cannot reach the Hugging Face Hub" in capsys.readouterr().err
    assert tree(tmp_path) == before


def _visible(run: Path) -> dict[str, str]:
    """``tree(run)`` without the hidden folder a new run is built in."""
    return {k: v for k, v in tree(run).items() if not k.startswith(run_folder.NEXT)}


@pytest.mark.slow
@pytest.mark.parametrize("when", ["before-its-first-checkpoint", "after-its-first-checkpoint"])
def test_an_overwrite_killed_leaves_the_previous_run_readable(when, world, tmp_path):
    """kill -9 of ``train --overwrite_output_dir``: the previous run stays whole where readers
    look until the new one has finished; then the same command (or a resume) completes it and
    replaces the previous run."""
    w = world["w"]
    run = shutil.copytree(w / "run", tmp_path / "run")
    before = tree(run)
    image = next((w / "data" / "images").iterdir())
    describe = ["describe", "--model", run, image, "--max-new-tokens", "8"]
    old = galaxy_llava(*describe, cwd=tmp_path)
    assert old.returncode == 0, old.stderr[-2000:]
    argv = ["train", "--method", "lora", "--model", w / "model", "--data", w / "data",
            "--output_dir", run, "--overwrite_output_dir", "--num_train_epochs", "1",
            "--per_device_train_batch_size", "4", "--learning_rate", "3e-2", "--seed", "1"]
    argv += ["--save_steps", "1"] if when.startswith("after") else ["--save_strategy", "no"]
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "galaxy_llava", *map(str, argv)],
                                env=ENV, stdout=f, stderr=subprocess.STDOUT)
        if when.startswith("before"):
            _wait_for(log, "effective batch", proc)
        else:
            t0 = time.time()
            while proc.poll() is None and time.time() - t0 < 300 and not any(
                    run_folder._complete(p) for p in run.glob("**/checkpoint-*")
                    if str(p.relative_to(run)) not in before):  # the new run's first
                time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-2000:]
    assert _visible(run) == before  # the previous run, whole, where every reader looks
    killed = galaxy_llava(*describe, cwd=tmp_path)
    assert killed.returncode == 0 and killed.stdout == old.stdout, killed.stderr[-2000:]
    again = (["train", "--output_dir", run, "--resume_from_checkpoint", "last"]
             if when.startswith("after") else argv)
    r = galaxy_llava(*again, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert leftovers(tmp_path) == []
    assert (tree(run / "adapter") != {k[len("adapter/"):]: v for k, v in before.items()
                                      if k.startswith("adapter/")})
    last = max(int(k.split("-")[1]) for k in before if re.fullmatch(r"checkpoint-\d+", k))
    assert f"checkpoint-{last}" not in tree(run)  # the previous run's checkpoints went with it


# ----------------------------------------------------------------- kill -9, then again


def _wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout and proc.poll() is None:
        if log.exists() and text in log.read_text(errors="replace"):
            return
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_prepare_killed_at_a_random_moment_then_rerun_gives_the_same_dataset(
        seed, synth_dir, prepared_dir, tmp_path):
    out = tmp_path / "data"
    argv = [sys.executable, "-m", "galaxy_llava", "prepare", "--source", str(synth_dir), "--out",
            str(out), "--n-per-class", "12", "--seed", "0", "--image-size", "64",
            "--val-fraction", "0.2", "--test-fraction", "0.2", "--workers", "1"]
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        proc = subprocess.Popen(argv, env=ENV, stdout=f, stderr=subprocess.STDOUT)
        _wait_for(log, "images", proc)  # the catalogue is read: images are being written
        time.sleep(random.Random(seed).uniform(0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    r = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert tree(out) == tree(prepared_dir)  # byte-identical to the uninterrupted run
    assert leftovers(tmp_path) == []


def _finish(run: Path, tiny_model_dir, prepared_dir) -> None:
    """After a kill: resume from the last checkpoint, or start again when none was written."""
    if run_folder.checkpoints(run):
        argv = ["train", "--output_dir", run, "--resume_from_checkpoint", "last"]
    else:
        argv = ["train", *TRAIN, "--model", tiny_model_dir, "--data", prepared_dir,
                "--output_dir", run]
    assert cli_main([str(a) for a in argv]) == 0


def _same_run(run: Path, reference: Path) -> None:
    from safetensors.torch import load_file

    import torch

    a = load_file(run / "adapter" / "adapter_model.safetensors")
    b = load_file(reference / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    assert leftovers(run.parent) == []
    assert all(run_folder._complete(p) for p in run.glob("checkpoint-*"))


@pytest.mark.slow
def test_train_killed_at_a_random_moment_then_resumed_ends_as_the_whole_run(
        tiny_model_dir, prepared_dir, reference_run, tmp_path):
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "galaxy_llava", "train", *TRAIN, "--model", str(tiny_model_dir),
            "--data", str(prepared_dir), "--output_dir", str(run)]
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        proc = subprocess.Popen(argv, env=ENV, stdout=f, stderr=subprocess.STDOUT)
        _wait_for(log, "effective batch", proc)  # printed as training starts
        time.sleep(random.Random(3).uniform(0, 4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    _finish(run, tiny_model_dir, prepared_dir)
    _same_run(run, reference_run)


# Runs the CLI with torch.save writing only part of one checkpoint file, then kill -9.
KILL_IN_SAVE = """
import io, os, signal, sys, runpy, torch
target, which, fraction = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
real, seen = torch.save, []
def save(obj, f, *a, **k):
    if isinstance(f, (str, os.PathLike)) and os.path.basename(str(f)) == target:
        seen.append(f)
        if len(seen) == which:
            buf = io.BytesIO()
            real(obj, buf, *a, **k)
            with open(f, "wb") as out:
                out.write(buf.getvalue()[:int(len(buf.getvalue()) * fraction)])
            os.kill(os.getpid(), signal.SIGKILL)
    return real(obj, f, *a, **k)
torch.save = save
sys.argv = ["galaxy-llava", *sys.argv[4:]]
runpy.run_module("galaxy_llava", run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.parametrize("which", [1, 2])
def test_train_killed_inside_a_checkpoint_write_then_rerun_ends_as_the_whole_run(
        which, tiny_model_dir, prepared_dir, reference_run, tmp_path):
    """Inside the first checkpoint's write (nothing resumable: the same command again starts
    over) or the second's (resumed from the first); file and cut drawn from a seeded RNG."""
    rng = random.Random(which)
    target = rng.choice(["optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"])
    fraction = rng.uniform(0.05, 0.95)
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-c", KILL_IN_SAVE, target, str(which), str(fraction),
                        "train", *TRAIN, "--model", str(tiny_model_dir), "--data",
                        str(prepared_dir), "--output_dir", str(run)],
                       env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert len(run_folder.checkpoints(run)) == which - 1  # the cut one does not count
    _finish(run, tiny_model_dir, prepared_dir)
    _same_run(run, reference_run)


# ----------------------------------------------------------------- survey inputs (issue 21: 3, 5, 6)

QUICK = ["--batch-size", "2", "--num-beams", "1", "--max-new-tokens", "4", "--no-scores"]


def _galaxies(prepared_dir: Path, folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = sorted((prepared_dir / "images").iterdir())[:n]
    return [Path(shutil.copy(f, folder / f.name)) for f in files]


def test_a_failed_catalogue_does_not_block_the_corrected_retry(tiny_model_dir, prepared_dir,
                                                               tmp_path, capsys, monkeypatch):
    """A run that fails after part 0 (the disk fills up while part 1 is written: exit 2) left a
    manifest that refused the retry with changed inputs ("holds a different catalogue ... pass
    --overwrite"). Now the retry continues, keeping part 0, without --overwrite; a finished
    catalogue is never lost: other inputs into it are still refused."""
    import errno

    import pandas as pd

    import galaxy_llava.survey_catalogue as catalogue

    folder = tmp_path / "imgs"
    files = _galaxies(prepared_dir, folder, 4)
    out = tmp_path / "cat"
    argv = ["catalogue", "--model", str(tiny_model_dir), "--images", str(folder), "--out",
            str(out), "--part-size", "2", *QUICK]
    real = catalogue.write_part

    def full_disk(path, *a, **k):
        if Path(path).name == "part-00001.parquet":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *a, **k)

    monkeypatch.setattr(catalogue, "write_part", full_disk)
    assert cli_main(argv) == 2
    assert "no room to write" in capsys.readouterr().err
    monkeypatch.setattr(catalogue, "write_part", real)
    part0 = (out / "part-00000.parquet").stat().st_mtime_ns
    files[-1].unlink()  # the user changes the inputs too
    assert cli_main(argv) == 0, capsys.readouterr().err
    assert "keeping 1 part(s) still valid" in capsys.readouterr().out
    assert (out / "part-00000.parquet").stat().st_mtime_ns == part0
    fresh = tmp_path / "fresh"
    assert cli_main([*argv[:5], "--out", str(fresh), *argv[7:]]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(out), pd.read_parquet(fresh))
    before = tree(out)
    _galaxies(prepared_dir, folder, 4)  # finished: a catalogue of other inputs is refused
    assert cli_main(argv) == 2
    assert "holds a different catalogue" in capsys.readouterr().err
    assert tree(out) == before


def test_a_blank_cutout_beside_jpegs_is_not_described_as_a_galaxy(tiny_model_dir, prepared_dir,
                                                                  tmp_path, capsys):
    """An all-NaN FITS beside two JPEGs got a caption (exit 0); now one stderr line names it,
    the JPEGs are described and the exit code (3) says something was skipped."""
    import numpy as np
    from astropy.io import fits

    folder = tmp_path / "mixed"
    _galaxies(prepared_dir, folder, 2)
    fits.PrimaryHDU(np.full((16, 16), np.nan, np.float32)).writeto(folder / "blank.fits")
    assert cli_main(["describe", "--model", str(tiny_model_dir), str(folder), "--num-beams",
                     "1", "--max-new-tokens", "4"]) == 3
    captured = capsys.readouterr()
    assert captured.err.strip().count("\n") == 0
    assert "skipped" in captured.err and "blank.fits: no finite pixel" in captured.err
    assert len(captured.out.strip().splitlines()) == 2 and "blank.fits" not in captured.out


def test_ids_are_unique_in_a_catalogue(tiny_model_dir, prepared_dir, tmp_path, capsys):
    """A path list giving two files the id NGC1300 is refused in one line naming it; a folder
    with north/J1234.jpg and south/J1234.png gave two rows with the id J1234."""
    import pandas as pd

    a, b = _galaxies(prepared_dir, tmp_path / "imgs", 2)
    pd.DataFrame({"path": [a.name, b.name], "id": ["NGC1300", "NGC1300"]}).to_csv(
        tmp_path / "imgs" / "list.csv", index=False)
    out = tmp_path / "cat"
    argv = ["catalogue", "--model", str(tiny_model_dir), "--out", str(out), *QUICK]
    assert cli_main([*argv, "--images", str(tmp_path / "imgs" / "list.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert "NGC1300 (rows 1, 2)" in err and "\n" not in err and not out.exists()
    survey = tmp_path / "survey"
    (survey / "north").mkdir(parents=True)
    (survey / "south").mkdir()
    shutil.copy(a, survey / "north" / "J1234.jpg")
    from PIL import Image

    Image.open(b).save(survey / "south" / "J1234.png")
    assert cli_main([*argv, "--images", str(survey)]) == 0
    assert pd.read_parquet(out)["id"].tolist() == ["north/J1234.jpg", "south/J1234.png"]
