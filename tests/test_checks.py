"""checks: numbers in range, containment, whole weights and checkpoints, all without loading a
model (a model folder's preflight: tests/test_preflight.py)."""

from __future__ import annotations

import json
import math
import zipfile

import pytest

from galaxy_llava import checks
from galaxy_llava.errors import UserError


@pytest.mark.parametrize("value, kw, message", [
    (math.inf, {"low": 0}, "a finite number"), (math.nan, {"low": 0}, "a finite number"),
    (0, {"low": 0, "low_open": True}, "> 0"), (-1, {"low": 0}, ">= 0"),
    (1.0, {"low": 0, "high": 1, "high_open": True}, r"in \[0, 1\)"),
    (2.5, {"integer": True}, "an integer"), (True, {}, "a number"), ("3", {}, "a number"),
])
def test_number_refuses(value, kw, message):
    with pytest.raises(UserError, match=f"--x must be {message}"):
        checks.number("--x", value, **kw)


def test_number_and_seed_accept():
    checks.number("--x", 0.5, 0, 1, high_open=True)
    checks.number("--x", None, 0, optional=True)
    checks.seed("--seed", 0)
    with pytest.raises(UserError, match="--seed"):
        checks.seed("--seed", 2**32)


def test_containment(tmp_path):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    assert checks.contained("images/a.jpg", root, False, "w") == root / "images" / "a.jpg"
    assert checks.contained(str(root / "images/a.jpg"), root, False, "w") == root / "images/a.jpg"
    for bad in ("../x.jpg", "images/../../x.jpg", "/etc/passwd"):
        with pytest.raises(UserError, match="w: image .* is outside the folder"):
            checks.contained(bad, root, False, "w")
    assert checks.contained("../x.jpg", root, True, "w") == tmp_path / "x.jpg"
    (root / "link").symlink_to(tmp_path)  # links are followed: this one leads out
    assert not checks.inside(root / "link" / "x.jpg", root)
    with pytest.raises(UserError, match="image link/x.jpg leads through a link to .*x.jpg, "
                                         "outside the folder"):
        checks.contained("link/x.jpg", root, False, "w")
    assert checks.contained("link/x.jpg", root, True, "w") == root / "link" / "x.jpg"
    (root / "inner").symlink_to(root / "images")  # a link that stays inside is inside
    assert checks.inside(root / "inner" / "a.jpg", root)
    (tmp_path / "alias").symlink_to(root)  # the folder itself named through a link
    assert checks.contained("images/a.jpg", tmp_path / "alias", False, "w")


def _safetensors(path, n=4):
    header = json.dumps({"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}})
    header += " " * (-len(header) % 8)
    path.write_bytes(len(header).to_bytes(8, "little") + header.encode() + b"\0" * (4 * n))
    return path


def test_damaged_weights_are_one_line(tmp_path):
    good = _safetensors(tmp_path / "model.safetensors")
    checks.check_weights(tmp_path)
    data = good.read_bytes()
    for cut in (len(data) - 3, 20, 5):
        good.write_bytes(data[:cut])
        with pytest.raises(UserError, match="model.safetensors is truncated or corrupt"):
            checks.check_weights(tmp_path)
    good.write_bytes(b"\xff" * 8 + data[8:])
    with pytest.raises(UserError, match="truncated or corrupt"):
        checks.check_safetensors(good)


def test_damaged_torch_files_and_checkpoints(tmp_path):
    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text('{"global_step": 2}')
    with zipfile.ZipFile(ckpt / "optimizer.pt", "w") as z:
        z.writestr("archive/data.pkl", b"x" * 5000)
    _safetensors(ckpt / "adapter_model.safetensors")
    checks.check_checkpoint(ckpt)
    data = (ckpt / "optimizer.pt").read_bytes()
    (ckpt / "optimizer.pt").write_bytes(data[:len(data) // 2])
    with pytest.raises(UserError, match=r"checkpoint .*checkpoint-2 is damaged: .*optimizer.pt is "
                                        r"truncated or corrupt.*earlier checkpoint"):
        checks.check_checkpoint(ckpt)
    (ckpt / "trainer_state.json").write_text('{"glob')
    with pytest.raises(UserError, match="trainer_state.json is missing or not valid JSON"):
        checks.check_checkpoint(ckpt)

