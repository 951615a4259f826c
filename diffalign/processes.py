"""The processes of a `diffalign label` / `diffalign eval` run started with `accelerate launch`.

    accelerate launch --config_file configs/accelerate/cpu2.yaml -m diffalign.cli label ...

Work is cut into units that do not depend on the number of processes (label: generation
chunks; eval: sampler batches); unit i belongs to process i % world. Each process does its own
units (and writes what they produce), then `gather` hands every process the list of all
processes' results, in rank order, so the main process writes the same files one process
would. With one process (a plain `diffalign label`), nothing here touches torch.distributed.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any


@dataclass
class Processes:
    rank: int = 0
    world: int = 1
    state: Any = None  # accelerate's PartialState when world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def device(self):
        """This process's accelerator device (None with one process: the command's own default)."""
        return self.state.device if self.state is not None else None

    def owns(self, unit: int) -> bool:
        return unit % self.world == self.rank

    def gather(self, value: Any) -> list[Any]:
        """Every process's `value`, in rank order, on every process (picklable values)."""
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            self.state.wait_for_everyone()


def launched() -> Processes:
    """The processes `accelerate launch` (or torchrun) started, from WORLD_SIZE; one otherwise.

    Without a GPU the process group runs on the CPU (gloo), as `diffalign train` does."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Processes()
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    atexit.register(close_process_group)
    return Processes(rank=state.process_index, world=state.num_processes, state=state)


def close_process_group() -> None:
    """Tear the process group down before the interpreter does, all processes together: gloo's
    threads still running at exit, or a store host that left first, abort a process
    ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        except RuntimeError:  # a process that failed has already left: nothing to wait for
            pass
        dist.destroy_process_group()
