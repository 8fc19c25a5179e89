"""serve: the web app's handlers give describe's text and the grammar's probabilities, the batch
table and its CSV, one-line errors for bad uploads, the loopback default; (slow) the app driven in
headless Chromium gives describe's caption on the page."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from galaxy_llava.scoring import value_column
from galaxy_llava.cli import main as cli_main
from galaxy_llava.errors import UserError
from galaxy_llava.generate import describe_paths
from galaxy_llava.morphology import ATTRIBUTES
from conftest import require_for_browser_tests

gr = pytest.importorskip("gradio", reason="the web app's extra is not installed "
                         "(pip install 'galaxy-llava[serve]')")

from galaxy_llava.serve import (ServedModel, build_app, example_images,  # noqa: E402
                                host_warning, is_loopback)

pytestmark = pytest.mark.usefixtures("one_thread")


def _images(folder: Path, n: int, size: int = 48) -> list[Path]:
    """``n`` different noise images saved as PNG in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        rng = np.random.default_rng(i)
        path = folder / f"galaxy-{i}.png"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def app(lora_run):
    """The app around the LoRA run fixture, its model loaded once."""
    return build_app(ServedModel.load(lora_run[0]))


def _handler(app, name: str):
    """The function behind the app's event ``name`` (its api_name): the wiring is tested too."""
    found = [f.fn for f in app.fns.values() if f.api_name == name]
    assert len(found) == 1, f"no single event {name!r} in the app"
    return found[0]


def test_describe_gives_describes_text_and_probabilities_per_attribute(app, lora_run, tmp_path):
    run = lora_run[0]
    [image] = _images(tmp_path, 1)
    expected = describe_paths(run, [image], scores_rules="reference")[0]
    text, best, entropy, *labels = _handler(app, "describe")(str(image))
    assert text == expected["caption"]
    assert best == expected["best_caption"]
    assert entropy.endswith("nats") and float(entropy.split()[0]) >= 0
    assert len(labels) == len(ATTRIBUTES)
    for attribute, probs in zip(ATTRIBUTES, labels):
        assert probs == pytest.approx({v: expected[value_column(attribute, v)] for v in probs})
        assert {value_column(attribute, v) for v in probs} == {
            c for c in expected if c.startswith(f"p_{attribute}_")}
        assert sum(probs.values()) == pytest.approx(1.0)
        assert all(0.0 <= p <= 1.0 for p in probs.values())


def test_batch_table_matches_describe_and_downloads_as_csv(app, lora_run, tmp_path):
    import pandas as pd

    images = _images(tmp_path / "in", 3)
    expected = describe_paths(lora_run[0], images, scores_rules="reference")
    table, csv = _handler(app, "batch")([str(p) for p in images])
    assert list(table["file"]) == [p.name for p in images]
    assert list(table["caption"]) == [e["caption"] for e in expected]
    assert list(table["best_caption"]) == [e["best_caption"] for e in expected]
    assert list(table.columns) == ["file", *list(expected[0])[1:]]  # describe's names
    for attribute in ATTRIBUTES:
        cols = [c for c in table.columns if c.startswith(f"p_{attribute}_")]
        assert cols and np.allclose(table[cols].sum(axis=1), 1.0)
    back = pd.read_csv(csv, keep_default_na=False, dtype={"arms": str})
    assert Path(csv).name.endswith(".csv") and list(back.columns) == list(table.columns)
    assert list(back["caption"]) == list(table["caption"])
    assert np.allclose(back["p_type_spiral"], table["p_type_spiral"])


def test_a_long_running_app_keeps_only_the_last_batch_csvs(app, tmp_path, monkeypatch):
    """Each Batch request writes its CSV into the app's one temporary folder, and the oldest
    beyond KEEP_CSVS go: a server that runs for weeks does not fill the disk."""
    import galaxy_llava.serve as serve

    monkeypatch.setattr(serve, "KEEP_CSVS", 2)
    batch = _handler(app, "batch")
    images = _images(tmp_path / "in", 3)
    csvs = [Path(batch([str(p)])[1]) for p in images]  # one request per image
    home = csvs[0].parent.parent
    assert all(c.parent.parent == home for c in csvs) and len({c.parent for c in csvs}) == 3
    assert [c.is_file() for c in csvs] == [False, True, True]  # the oldest went
    assert sorted(p.name for p in home.iterdir()) == sorted(c.parent.name for c in csvs[1:])
    assert csvs[-1].read_text().count(images[-1].name) == 1  # the newest is this request's
    monkeypatch.setattr(serve, "KEEP_CSVS", 1)
    paths = [serve._csv_path(home) for _ in range(5)]  # the folders alone, no model
    assert list(home.iterdir()) == [paths[-1].parent]


def test_bad_uploads_are_one_line_errors_on_the_page(app, tmp_path, monkeypatch):
    describe, batch = _handler(app, "describe"), _handler(app, "batch")
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    for call, arg, words in ((describe, None, "upload an image"),
                             (describe, str(not_image), "not an image file"),
                             (batch, [], "add one or more images"),
                             (batch, [str(not_image)], "not an image file")):
        with pytest.raises(gr.Error) as e:
            call(arg)
        assert words in str(e.value) and "\n" not in str(e.value)
    [image] = _images(tmp_path, 1)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a 48x48 image is now a "bomb"
    with pytest.raises(gr.Error, match="decompression-bomb"):
        describe(str(image))
    monkeypatch.setattr("galaxy_llava.serve.MAX_BATCH", 2)
    with pytest.raises(gr.Error, match="more than one request takes"):
        batch([str(image)] * 3)


def test_the_model_is_loaded_once(lora_run, tmp_path, monkeypatch):
    import galaxy_llava.models.loading as loading

    calls = []
    real = loading.load_for_inference
    monkeypatch.setattr(loading, "load_for_inference",
                        lambda *a, **k: calls.append(a) or real(*a, **k))
    app = build_app(lora_run[0], num_beams=1, max_new_tokens=5)
    [image] = _images(tmp_path, 1)
    first = _handler(app, "describe")(str(image))
    second = _handler(app, "describe")(str(image))
    assert len(calls) == 1 and first[0] == second[0]
    assert app.served.settings()["num_beams"] == 1
    assert "greedy" in app.served.settings()["decoding"]


def test_loopback_is_the_default_and_other_hosts_warn():
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost", "[::1]"):
        assert is_loopback(host) and host_warning(host) is None
    for host in ("0.0.0.0", "::", "192.168.1.10", "example.org"):
        warning = host_warning(host)
        assert warning and "exposes the app" in warning and "\n" not in warning
    from galaxy_llava.cli import build_parser

    args = build_parser().parse_args(["serve", "--model", "RUN"])
    assert (args.host, args.port, args.examples) == ("127.0.0.1", 7860, None)


def test_cli_warns_before_binding_beyond_loopback(lora_run, capsys, monkeypatch):
    import galaxy_llava.serve as serve

    launched = []

    class App:  # stands in for the gradio app: nothing is loaded or served
        def close(self):
            launched.append("closed")

        def remove_temporaries(self):
            launched.append("removed")

    def ctrl_c(seconds):  # the serving loop's first wait is interrupted
        raise KeyboardInterrupt

    monkeypatch.setattr(serve.time, "sleep", ctrl_c)
    monkeypatch.setattr(serve, "build_app", lambda model, examples, **k: App())
    monkeypatch.setattr(serve, "launch",
                        lambda app, host, port, block: launched.append((host, port, block)))
    run = str(lora_run[0])
    assert cli_main(["serve", "--model", run, "--host", "0.0.0.0", "--port", "8001"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exposes the app" in err[0]
    assert cli_main(["serve", "--model", run]) == 0
    assert capsys.readouterr().err.strip() == ""
    assert launched == [("0.0.0.0", 8001, False), "closed", "removed",
                        ("127.0.0.1", 7860, False), "closed", "removed"]


def test_examples_come_from_the_folder_or_the_recorded_training_data(tmp_path, lora_run):
    given = _images(tmp_path / "given", 3)
    assert example_images(lora_run[0], tmp_path / "given") == given
    with pytest.raises(UserError, match="does not exist"):
        example_images(lora_run[0], tmp_path / "missing")
    assert example_images(lora_run[0]) == []  # no config.yaml: no examples
    data = tmp_path / "data"
    images = _images(data / "images", 4)
    splits = ["train", "test", "val", "test"]
    (data / "dataset.jsonl").write_text("".join(
        json.dumps({"image": f"images/{p.name}", "text": "x", "split": s}) + "\n"
        for p, s in zip(images, splits)))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(f"data: {data}\n")
    assert example_images(run, limit=3) == [images[1], images[3], images[0]]
    shutil.rmtree(data)  # the data has moved since training: no examples, no error
    assert example_images(run) == []


def test_cli_refuses_bad_flags_in_one_line(lora_run, tmp_path, capsys, monkeypatch):
    run = str(lora_run[0])
    for argv, words in ((["--port", "0"], "--port"), (["--port", "70000"], "--port"),
                        (["--num-beams", "0"], "--num-beams"),
                        (["--examples", str(tmp_path / "none")], "does not exist")):
        assert cli_main(["serve", "--model", run, *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err
    monkeypatch.setitem(sys.modules, "gradio", None)  # the optional extra not installed
    assert cli_main(["serve", "--model", run]) == 2
    assert "galaxy-llava[serve]" in capsys.readouterr().err


def test_a_port_in_use_is_a_one_line_error():
    from galaxy_llava.serve import launch

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with gr.Blocks() as app:
            gr.Markdown("nothing")
        with pytest.raises(UserError, match="port is in use"):
            launch(app, "127.0.0.1", taken.getsockname()[1], block=False)


# ----------------------------------------------------------------- in a real browser

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(url: str, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"serve exited ({process.returncode}): "
                                 f"{process.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"serve did not answer on {url} in {timeout} s")


@pytest.mark.slow
def test_the_app_in_headless_chromium_shows_describes_caption(lora_run, tmp_path, chromium):
    try:
        import playwright.sync_api as playwright
    except ImportError:
        require_for_browser_tests("playwright", "pip install 'galaxy-llava[test]'")
    run = lora_run[0]
    images = _images(tmp_path / "examples", 2, size=64)
    expected = describe_paths(run, images)
    assert expected[0]["caption"] != expected[1]["caption"]  # so the page shows which was described
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    process = subprocess.Popen(
        [sys.executable, "-m", "galaxy_llava", "serve", "--model", str(run), "--port", str(port),
         "--examples", str(tmp_path / "examples")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_until_up(url, process)
        import httpx  # a gradio dependency

        too_big = httpx.post(f"{url}gradio_api/upload", timeout=60,
                             files={"files": ("big.png", b"\0" * (26 * 2**20))})
        assert too_big.status_code == 413  # MAX_FILE_SIZE, enforced by gradio on upload
        with playwright.sync_playwright() as p:
            # The system's chromium: playwright downloads no browser.
            browser = p.chromium.launch(executable_path=chromium,
                                        args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(url)
            page.locator("#image input[type=file]").set_input_files(str(images[1]))
            page.locator("#image img").first.wait_for(timeout=30_000)  # the upload is shown
            page.locator("#describe").click()
            best = page.locator("#best-caption textarea")
            playwright.expect(best).not_to_have_value("", timeout=60_000)
            shown = page.locator("#description textarea").input_value()
            assert shown == expected[1]["caption"]
            assert "This is an image of" in best.input_value()  # always a grammar caption
            settings = page.locator("#settings").inner_text()
            assert "beam search, 3 beams" in settings and "max_new_tokens 40" in settings
            png = page.screenshot(full_page=True)

            page.get_by_role("tab", name="Batch").click()
            page.locator("#batch-files input[type=file]").set_input_files([str(p) for p in images])
            uploaded = page.locator("#batch-files").get_by_label(images[1].name, exact=True)
            uploaded.wait_for(timeout=30_000)  # both listed: the upload is done
            page.locator("#describe-all").click()
            link = page.locator("#batch-csv a").first
            link.wait_for(timeout=60_000)
            with page.expect_download() as download:
                link.click()
            csv = Path(download.value.path()).read_text()
            browser.close()
        import pandas as pd

        table = pd.read_csv(io.StringIO(csv), keep_default_na=False)
        assert list(table["file"]) == [p.name for p in images]
        assert list(table["caption"]) == [e["caption"] for e in expected]
        with Image.open(io.BytesIO(png)) as im:
            assert im.convert("L").getextrema()[1] > 0, "screenshot is blank"
    finally:
        process.send_signal(signal.SIGINT)  # Ctrl-C: the server closes and the process ends
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert process.returncode in (0, 130), process.stderr.read()[-2000:]
