"""Several trained tasks in one model, with one frozen pass shared by all of them.

Only a disentangled method can share the pass: a DTL task changes nothing in blocks 0..M of the frozen backbone (its
side network reads them and adds back from block M on), so tasks on the same backbone see the same block states
up to their own M. :class:`MultiTaskModel` runs the frozen backbone once, up to the largest M among its DTL
tasks, keeping each block's state, and then runs each task's own suffix (blocks M+1..N-1 with its side network,
and its head) from the states its M reads. An entangled method (LoRA, adapters, BitFit, SSF, VPT, full) changes
every block, so such a task runs its whole model. The predictions equal each task model's own, bit for bit on a
CPU in fp32: the shared pass runs the same operations in the same order.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from .methods import DTLModel


class MultiTaskModel(nn.Module):
    """``{task: logits}`` for a batch of images, from several task models (e.g. ``dtl.load_trained`` results).

    The DTL tasks' frozen backbones must hold the same weights (the same checkpoint): they are replaced by one
    shared copy, so N tasks cost one backbone in memory."""

    def __init__(self, models: Mapping[str, nn.Module]):
        super().__init__()
        if not models:
            raise ValueError("MultiTaskModel needs at least one task model")
        self.tasks = nn.ModuleDict(dict(models))
        shared_tasks = [task for task, model in models.items() if isinstance(model, DTLModel)]
        self.shared_tasks = shared_tasks
        if shared_tasks:
            first = models[shared_tasks[0]]
            reference = first.family.state_dict()
            for task in shared_tasks[1:]:
                model = models[task]
                if type(model.family) is not type(first.family) or not _same_tensors(model.family.state_dict(),
                                                                                        reference):
                    raise ValueError(f"task {task!r}: its frozen backbone differs from task {shared_tasks[0]!r}'s "
                                     "(another backbone, checkpoint or dtype); tasks that share the pass need one")
                model.family = first.family  # one copy in memory; it is frozen, so nothing diverges

    @property
    def shared_family(self):
        return self.tasks[self.shared_tasks[0]].family if self.shared_tasks else None

    @property
    def shared_blocks(self) -> int:
        """How many frozen blocks run once for all the DTL tasks (0 without DTL tasks)."""
        return 1 + max(self.tasks[t].start_block for t in self.shared_tasks) if self.shared_tasks else 0

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        logits: dict[str, torch.Tensor] = {}
        if self.shared_tasks:
            first: DTLModel = self.tasks[self.shared_tasks[0]]
            states = first.compute_frozen(images, last_block=self.shared_blocks - 1)
            for task in self.shared_tasks:
                model: DTLModel = self.tasks[task]
                logits[task] = model.forward_suffix(model.state_from_cache(states))
        for task, model in self.tasks.items():
            if task not in logits:
                logits[task] = model(images)
        return {task: logits[task] for task in self.tasks}


def _same_tensors(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
