"""`galaxy-llava serve`: try a model by hand in the browser (a Gradio app).

Tab *Describe*: one image (uploaded, or an example galaxy) -> the description exactly as
``galaxy-llava describe`` gives it (same loader, prompt and beam search), the grammar's most
probable caption and each attribute's probability (:mod:`galaxy_llava.scoring`), with the
decoding settings on the page. Tab *Batch*: several images -> one table row each (the columns of
``galaxy-llava catalogue``), downloadable as CSV.

The model is loaded once (:class:`ServedModel`) and used by one request at a time (a lock: the
CPU or GPU is saturated by one already). The app binds to 127.0.0.1 unless told otherwise, since
it has no authentication; uploads are capped in bytes by Gradio (``MAX_FILE_SIZE``) and opened
through :func:`galaxy_llava.records.load_image` (decompression-bomb guard, one-line errors).
Gradio is an optional dependency (``pip install 'galaxy-llava[serve]'``), imported only here.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from galaxy_llava import checks
from galaxy_llava.config import DECODING
from galaxy_llava.errors import UserError
from galaxy_llava.io import write_text
from galaxy_llava.models.folders import checkpoint_run, run_settings
from galaxy_llava.models.preflight import check_generation
from galaxy_llava.morphology import ATTRIBUTES
from galaxy_llava.records import load_image, load_records

MAX_FILE_SIZE = "25mb"   # per uploaded file; a galaxy cutout is tens of kB
MAX_BATCH = 64           # images per batch request: one request must not hold the model for long
MAX_EXAMPLES = 8         # example galaxies offered under the image
_CSV_NAME = "galaxy-llava-descriptions.csv"
# Batch CSVs kept per app: gradio copies a returned file into its own cache (which it empties
# hourly), so older ones are only disk that a long-running server would otherwise fill.
KEEP_CSVS = 4


def _gradio():
    """The gradio module, or a one-line error saying how to install it."""
    try:
        import gradio
    except ImportError:
        raise UserError("the web app needs Gradio: pip install 'galaxy-llava[serve]' "
                        "(or pip install 'gradio>=5')") from None
    return gradio


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable only from this machine (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def host_warning(host: str) -> str | None:
    """The one-line warning for a host other than loopback (None for loopback): the app has no
    authentication, so binding elsewhere lets anyone who can reach the port use the model."""
    if is_loopback(host):
        return None
    return (f"warning: --host {host} exposes the app (no authentication) to every machine that "
            "can reach this one; use 127.0.0.1 unless you mean to share it")


@dataclass
class ServedModel:
    """A model loaded once for the app: the inference model, its processor and stored prompt,
    and the decoding and scoring settings every request uses."""

    model: Any
    processor: Any
    prompt: str
    name: str
    num_beams: int = DECODING.num_beams
    max_new_tokens: int = DECODING.max_new_tokens
    rules: str = "reference"
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def load(cls, run: str | os.PathLike, device=None, **settings) -> "ServedModel":
        """Load a RUN folder, model folder or Hub id the way ``describe`` does."""
        from galaxy_llava.models.loading import load_for_inference

        model, processor, prompt = load_for_inference(run, device=device)
        return cls(model, processor, prompt, str(run), **settings)

    def settings(self) -> dict:
        """The decoding and scoring settings shown on the page (and used by every request)."""
        param = next(self.model.parameters())
        return {"model": self.name, "prompt": self.prompt,
                "decoding": "greedy" if self.num_beams == 1 else f"beam search, "
                            f"{self.num_beams} beams",
                "num_beams": self.num_beams, "max_new_tokens": self.max_new_tokens,
                "do_sample": False, "no_repeat_ngram_size": 0, "rules": self.rules,
                "device": str(param.device), "dtype": str(param.dtype).replace("torch.", "")}

    def describe(self, paths: list[str | os.PathLike]) -> list[dict]:
        """``[{image, caption, scores}]`` for image files: ``caption`` as ``describe`` gives it
        (batches of 16, as its default), ``scores`` the
        :class:`~galaxy_llava.scoring.GrammarScores`."""
        from galaxy_llava.generate import describe_images
        from galaxy_llava.scoring import grammar_scores

        for p in paths:  # every file checked (header only) before the model runs
            load_image(p, decode=False)
        # Paths, not decoded images: both functions decode a batch (or one image) at a time, so
        # a request of many large images never holds them all in memory.
        with self.lock:
            texts = describe_images(self.model, self.processor, paths, self.prompt,
                                    batch_size=DECODING.batch_size, num_beams=self.num_beams,
                                    max_new_tokens=self.max_new_tokens, progress=False)
            scores = grammar_scores(self.model, self.processor, paths, self.rules, self.prompt)
        return [{"image": str(p), "caption": t, "scores": s}
                for p, t, s in zip(paths, texts, scores, strict=True)]


def describe_one(served: ServedModel, image: str | None) -> tuple:
    """The Describe tab's handler: (description, best grammar caption, entropy text, then one
    ``{value: probability}`` per attribute of ``ATTRIBUTES``)."""
    if not image:
        raise UserError("upload an image or pick an example galaxy first")
    result = served.describe([image])[0]
    scores = result["scores"]
    return (result["caption"], scores.best, f"{scores.entropy:.3f} nats",
            *(dict(scores.marginals[a]) for a in ATTRIBUTES))


def describe_batch(served: ServedModel, files: list | None, out_dir: str | os.PathLike):
    """The Batch tab's handler: a table (file, caption, then ``catalogue``'s scored columns)
    and the path of the same table as CSV, written atomically under ``out_dir``."""
    import pandas as pd

    from galaxy_llava.scoring import by_caption, score_columns

    paths = [getattr(f, "name", f) for f in files or []]  # gradio gives paths (or old wrappers)
    if not paths:
        raise UserError("add one or more images first")
    if len(paths) > MAX_BATCH:
        raise UserError(f"{len(paths)} images is more than one request takes ({MAX_BATCH}); "
                        "use `galaxy-llava catalogue` for many images")
    captions = by_caption(served.rules)
    rows = [{"file": Path(r["image"]).name, "caption": r["caption"],
             **score_columns(r["scores"], captions)} for r in served.describe(paths)]
    table = pd.DataFrame(rows)
    csv = _csv_path(out_dir)
    write_text(csv, table.to_csv(index=False))
    return table, str(csv)


def _csv_path(out_dir: str | os.PathLike) -> Path:
    """Where one Batch request writes its CSV: a new folder under ``out_dir`` (so the download
    keeps its plain name while requests never share a file), the folders of all but the newest
    :data:`KEEP_CSVS` requests removed."""
    out = Path(out_dir)
    # Names sort by creation: a monotonic clock (never set back) in front of mkdtemp's suffix.
    folder = Path(tempfile.mkdtemp(prefix=f"{time.monotonic_ns():020d}-", dir=out))
    older = sorted(p for p in out.iterdir() if p.is_dir() and p != folder)
    for old in older[:max(0, len(older) - (KEEP_CSVS - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return folder / _CSV_NAME


def example_images(run: str | os.PathLike, examples: str | os.PathLike | None = None,
                   limit: int = MAX_EXAMPLES) -> list[Path]:
    """Example galaxies: the images of ``examples`` (a folder, or files), else the first images
    of the dataset the run (or a checkpoint's run) was trained on (test split first, as recorded
    in ``config.yaml``), else none. A given ``examples`` that holds no image is an error; a
    recorded dataset that has moved is not (the app just offers no examples)."""
    from galaxy_llava.generate import expand_image_paths

    if examples is not None:
        return expand_image_paths([examples])[:limit]

    try:
        data = run_settings(checkpoint_run(run) or run).get("data")
        records = load_records(data) if data else []
    except UserError:
        return []
    records.sort(key=lambda r: r.get("split") != "test")  # stable: test images first
    return [Path(r["image"]) for r in records[:limit]]


def _settings_markdown(served: ServedModel) -> str:
    s = served.settings()
    prompt = s["prompt"].replace("`", "'").replace("\n", "\\n")
    shown = ("decoding", "max_new_tokens", "do_sample", "no_repeat_ngram_size", "rules", "device",
             "dtype")
    return ("**Decoding settings** (as `galaxy-llava describe`): "
            + " · ".join(f"{k} `{s[k]}`" for k in shown) + f"  \nprompt `{prompt}`")


def build_app(model: ServedModel | str | os.PathLike, examples: list | None = None,
              **settings):
    """The Gradio app (``gr.Blocks``, not launched) around ``model``: a :class:`ServedModel`, or
    a run/model folder or Hub id loaded here once (``settings``: num_beams, max_new_tokens,
    rules). ``examples``: image paths offered under the upload box."""
    gr = _gradio()
    served = model if isinstance(model, ServedModel) else ServedModel.load(model, **settings)
    csv_dir = tempfile.mkdtemp(prefix="galaxy-llava-serve-")  # gradio serves copies from its cache

    def on_describe(image):
        try:
            return describe_one(served, image)
        except UserError as e:  # shown on the page in one line, like the CLI's errors
            raise gr.Error(str(e)) from None

    def on_batch(files):
        try:
            return describe_batch(served, files, csv_dir)
        except UserError as e:
            raise gr.Error(str(e)) from None

    # Uploads and outputs in gradio's cache are removed after an hour.
    with gr.Blocks(title="galaxy-llava", analytics_enabled=False,
                   delete_cache=(3600, 3600)) as app:
        gr.Markdown(f"## galaxy-llava: describe galaxy images\nModel: `{served.name}`")
        with gr.Tab("Describe"):
            with gr.Row():
                with gr.Column(scale=1):
                    image = gr.Image(type="filepath", label="Galaxy image", elem_id="image",
                                     sources=["upload", "clipboard"], height=320)
                    button = gr.Button("Describe", variant="primary", elem_id="describe")
                    if examples:
                        gr.Examples([[str(p)] for p in examples], inputs=[image],
                                    label="Example galaxies")
                with gr.Column(scale=2):
                    text = gr.Textbox(label="Description (as galaxy-llava describe)",
                                      elem_id="description", interactive=False)
                    best = gr.Textbox(label="Most probable caption of the grammar",
                                      elem_id="best-caption", interactive=False)
                    entropy = gr.Textbox(label="Entropy of the grammar posterior",
                                         elem_id="entropy", interactive=False)
                    labels = []
                    for row in (ATTRIBUTES[:4], ATTRIBUTES[4:]):
                        with gr.Row():
                            labels += [gr.Label(label=a.replace("_", " "), num_top_classes=4,
                                                elem_id=f"p-{a}", min_width=120) for a in row]
            gr.Markdown(_settings_markdown(served), elem_id="settings")
            button.click(on_describe, inputs=[image], outputs=[text, best, entropy, *labels],
                         api_name="describe")
        with gr.Tab("Batch"):
            files = gr.File(file_count="multiple", file_types=["image"], type="filepath",
                            label=f"Galaxy images (up to {MAX_BATCH})", elem_id="batch-files")
            run_batch = gr.Button("Describe all", variant="primary", elem_id="describe-all")
            table = gr.Dataframe(label="Descriptions", elem_id="batch-table", interactive=False,
                                 wrap=True)
            csv = gr.File(label="Download CSV", elem_id="batch-csv", interactive=False)
            run_batch.click(on_batch, inputs=[files], outputs=[table, csv], api_name="batch")
    app.served = served  # for callers and tests: the one loaded model
    # At exit, when the app is dropped, or when stop() calls it.
    app.remove_temporaries = weakref.finalize(app, shutil.rmtree, csv_dir, True)
    return app


def stop(app, timeout: float = 15.0) -> None:
    """Close the server and remove the app's temporaries. Gradio's close can wait on open
    connections (seen in CI: still running a minute after Ctrl-C), so it gets ``timeout``
    seconds in a helper thread; then the process leaves even if a library thread lingers."""
    closer = threading.Thread(target=app.close, daemon=True)
    closer.start()
    closer.join(timeout)
    app.remove_temporaries()
    if closer.is_alive():
        print("the server did not close in time; leaving", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(0)


def launch(app, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Serve ``app`` on ``host:port`` (uploads capped at ``MAX_FILE_SIZE``, no share link, no
    analytics); with ``block=False`` return once it is up (the caller closes it)."""
    try:
        return app.launch(server_name=host, server_port=port, share=False, inbrowser=False,
                          max_file_size=MAX_FILE_SIZE, prevent_thread_lock=not block, quiet=True)
    except OSError as e:
        if e.errno is not None or "port" not in str(e):
            raise
        # gradio's "Cannot find empty port": taken, or an address that is not this machine's.
        raise UserError(f"cannot serve on {host}:{port}: the port is in use or the address is "
                        "not one of this machine's; pass another --port or --host") from None


def serve(model: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 7860,
          examples: str | os.PathLike | None = None, num_beams: int = DECODING.num_beams,
          max_new_tokens: int = DECODING.max_new_tokens, rules: str = "reference") -> None:
    """``galaxy-llava serve``: check the settings, warn about a non-loopback ``host``, load the
    model once and serve the web app until interrupted (Ctrl-C or SIGTERM)."""
    checks.number("--port", port, 1, 65535, integer=True)
    check_generation(model, 1, num_beams, max_new_tokens)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local tool phones no one
    _gradio()  # before the model loads: a missing extra costs no minutes
    examples = example_images(model, examples)
    warning = host_warning(host)
    if warning:
        print(warning, file=sys.stderr)
    app = build_app(model, examples, num_beams=num_beams,
                    max_new_tokens=max_new_tokens, rules=rules)
    launch(app, host, port, block=False)
    host = f"[{host}]" if ":" in host else host
    print(f"serving {model} on http://{host}:{port} (Ctrl-C stops)", flush=True)
    # Ctrl-C and SIGTERM (a service manager, `kill`) both stop it, even when the process was
    # started with SIGINT ignored (a background job of a non-interactive shell: seen in CI).
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop(app)
    print("stopped", flush=True)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
