"""FSDP on CPU processes: the one place galaxy-llava writes accelerate's private state.

Why: accelerate (1.16) keeps a multi-CPU run (``torchrun`` on gloo) as plain DDP and drops the
FSDP plugin without a word, though FSDP2 runs on gloo. :func:`enable_fsdp_on_cpu` switches such a
run to FSDP as asked; it does nothing on GPUs or without ``--fsdp``.

It writes ``PartialState._shared_state`` (private: ``AcceleratorState`` re-copies that dict
whenever it is constructed, so setting the public state alone would be undone). It was written
for accelerate :data:`WRITTEN_FOR`; ``tests/test_accelerate_fsdp_cpu.py`` fails when another
version is installed, naming what to re-check.
"""

from __future__ import annotations

from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

WRITTEN_FOR = "1.16"  # accelerate's major.minor this patch was checked against


def enable_fsdp_on_cpu(state, fsdp_plugin_args: dict | None) -> bool:
    """Switch accelerate's ``state`` (an ``AcceleratorState``) from multi-CPU DDP to FSDP with a
    plugin built from ``fsdp_plugin_args`` (``TrainingArguments.fsdp_plugin_args``) when FSDP
    was asked for on CPU processes; returns whether it switched."""
    if not fsdp_plugin_args or state.distributed_type != DistributedType.MULTI_CPU:
        return False
    # AcceleratorState re-copies PartialState's dict when constructed: set both.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**fsdp_plugin_args)
    return True
