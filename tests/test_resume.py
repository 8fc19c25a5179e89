"""resume: a checkpoint's files checked as the Trainer loads them, and against the model."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from torch import nn

from galaxy_llava.errors import UserError
from galaxy_llava.training.resume import check_fits, read_checkpoint
from galaxy_llava.training.trainer import GalaxyTrainer


def _model(width: int = 4) -> nn.Module:
    return nn.Sequential(nn.Linear(3, width), nn.LayerNorm(width), nn.Linear(width, 2))


def _checkpoint(folder, model, kind="full"):
    """A checkpoint as the Trainer writes one: weights marker, trainer state, the optimizer
    (AdamW over the Trainer's two groups, after a step), scheduler and RNG states."""
    folder.mkdir()
    (folder / ("config.json" if kind == "full" else "adapter_config.json")).write_text("{}")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 1}))
    decay = set(GalaxyTrainer.get_decay_parameter_names(None, model))
    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW([{"params": [p for n, p in named if n in decay]},
                                   {"params": [p for n, p in named if n not in decay]}])
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save({"last_epoch": 1}, folder / "scheduler.pt")
    torch.save({"cpu": torch.random.get_rng_state()}, folder / "rng_state.pth")
    return folder


class _Runs:
    def __reduce__(self):
        return (print, ("this pickle ran",))


def test_a_checkpoint_that_fits_passes(tmp_path):
    model = _model()
    found = read_checkpoint(_checkpoint(tmp_path / "c", model), "full")
    assert found.kind == "full" and found.optimizer is not None
    check_fits(found, model, GalaxyTrainer.get_decay_parameter_names(None, model))


@pytest.mark.parametrize("bad", ["random", "pickle", "list"])
def test_unloadable_state_files_are_one_line(tmp_path, bad, capsys):
    folder = _checkpoint(tmp_path / "c", _model())
    target = folder / ("scheduler.pt" if bad == "list" else "optimizer.pt")
    if bad == "random":
        target.write_bytes(bytes(range(256)) * 8)
    elif bad == "pickle":
        target.write_bytes(pickle.dumps(_Runs()))
    else:
        torch.save([1, 2], target)
    with pytest.raises(UserError, match=f"cannot resume from {folder}: {target.name} "):
        read_checkpoint(folder, "full")
    assert "this pickle ran" not in capsys.readouterr().out


def test_the_method_must_match_the_checkpoint(tmp_path):
    full = _checkpoint(tmp_path / "full", _model())
    adapter = _checkpoint(tmp_path / "adapter", _model(), kind="adapter")
    with pytest.raises(UserError, match="holds a full fine-tune, not a LoRA adapter"):
        read_checkpoint(full, "lora")
    with pytest.raises(UserError, match="holds a LoRA adapter, not a full fine-tune"):
        read_checkpoint(adapter, "full")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "trainer_state.json").write_text("{}")
    with pytest.raises(UserError, match="holds no model or adapter weights"):
        read_checkpoint(tmp_path / "empty", "full")


def test_an_optimizer_state_of_other_parameters_is_refused(tmp_path):
    found = read_checkpoint(_checkpoint(tmp_path / "c", _model(width=4)), "full")
    wider = _model(width=6)  # the same groups, other shapes
    with pytest.raises(UserError, match=r"its optimizer's exp_avg for 0.weight has shape "
                                        r"\[4, 3\], this run's parameter \[6, 3\]"):
        check_fits(found, wider, GalaxyTrainer.get_decay_parameter_names(None, wider))
    frozen = _model(width=4)
    frozen[2].requires_grad_(False)  # fewer trainable tensors
    with pytest.raises(UserError, match=r"parameter groups of \[2, 4\] tensors, this run's "
                                        r"model trains \[1, 3\]"):
        check_fits(found, frozen, GalaxyTrainer.get_decay_parameter_names(None, frozen))
