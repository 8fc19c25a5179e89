"""accelerate_fsdp_cpu: the private-state patch that runs FSDP on CPU processes switches only a
multi-CPU state asked for FSDP, and is pinned to the accelerate it was written for.

The end-to-end check (two gloo processes really sharded) is
test_trainer.py::test_torchrun_fsdp_shards_the_model_trains_and_saves_full_weights (slow)."""

from __future__ import annotations

from types import SimpleNamespace

import accelerate
import pytest
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from galaxy_llava.training.accelerate_fsdp_cpu import WRITTEN_FOR, enable_fsdp_on_cpu


def test_written_for_the_installed_accelerate():
    """Fails loudly on an accelerate upgrade: the patch writes private state, so re-check it."""
    installed = ".".join(accelerate.__version__.split(".")[:2])
    assert installed == WRITTEN_FOR, (
        f"accelerate {accelerate.__version__} is installed; training/accelerate_fsdp_cpu.py was "
        f"written for {WRITTEN_FOR}.x. Re-check in accelerate/state.py: (1) does a multi-CPU "
        "AcceleratorState still become MULTI_CPU and drop the FSDP plugin? If it now keeps FSDP, "
        "delete the patch. (2) Does AcceleratorState.__init__ still copy "
        "PartialState._shared_state and write back its 'distributed_type'? Then run "
        "test_trainer.py::test_torchrun_fsdp_shards_the_model_trains_and_saves_full_weights "
        "and set WRITTEN_FOR.")


def test_the_private_state_it_writes_still_exists():
    """The names the patch relies on: a shared dict on PartialState that AcceleratorState
    reads its ``distributed_type`` from, and the enum values it switches between."""
    import inspect

    assert "_shared_state" in vars(PartialState) and "_shared_state" in vars(AcceleratorState)
    init = inspect.getsource(AcceleratorState.__init__)
    assert "self.__dict__.update(PartialState._shared_state)" in init
    assert 'PartialState._shared_state["distributed_type"] = self.distributed_type' in init
    assert {"MULTI_CPU", "FSDP"} <= set(DistributedType.__members__)


@pytest.fixture
def shared_state():
    """PartialState's shared dict as it was, restored afterwards (the test writes into it)."""
    saved = dict(PartialState._shared_state)
    yield PartialState._shared_state
    PartialState._shared_state.clear()
    PartialState._shared_state.update(saved)


def test_switches_a_multi_cpu_state_asked_for_fsdp(shared_state):
    state = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, fsdp_plugin=None)
    assert enable_fsdp_on_cpu(state, {"fsdp_version": 2})
    assert state.distributed_type == DistributedType.FSDP
    assert shared_state["distributed_type"] == DistributedType.FSDP  # what AcceleratorState copies
    assert isinstance(state.fsdp_plugin, FullyShardedDataParallelPlugin)
    assert state.fsdp_plugin.fsdp_version == 2


@pytest.mark.parametrize("kind, fsdp", [
    (DistributedType.MULTI_CPU, None),  # no --fsdp: plain DDP stays
    (DistributedType.MULTI_CPU, {}),
    (DistributedType.MULTI_GPU, {"fsdp_version": 2}),  # accelerate handles GPUs itself
    (DistributedType.NO, {"fsdp_version": 2}),
])
def test_leaves_every_other_state_alone(shared_state, kind, fsdp):
    before = dict(shared_state)
    state = SimpleNamespace(distributed_type=kind, fsdp_plugin=None)
    assert not enable_fsdp_on_cpu(state, fsdp)
    assert state.distributed_type == kind and state.fsdp_plugin is None
    assert dict(shared_state) == before
