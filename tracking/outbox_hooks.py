"""What the outbox (:mod:`tracking.outbox`) sends on behalf of the rest of the tracking package, which it does not
import.

The outbox journals and sends a run's own records (params, metrics, tags, inputs, artifacts, status). Any other
kind of record is sent by the function registered here for its kind; and a run created while the store was
unreachable may name its experiment by name only, which the registered experiment maker turns into the store's
id. The tracking package registers both when it is imported, and a submodule is always imported after its
package, so every process that sends or replays a journal knows them.

They live apart from the outbox because ``python -m tracking.outbox`` runs that file a second time, as
``__main__``: registrations kept in the outbox's own globals would be missing from that copy.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# MLflow's tag naming a run's parent: tracking.Run sets it on a run it creates, the outbox on one created from a
# record (whose parent may have had a provisional id).
TAG_PARENT = "mlflow.parentRunId"

# Sends one record: (the store's MlflowClient, the store's id of the record's ``run`` or None, the record).
RecordSender = Callable[[Any, "str | None", dict[str, Any]], None]
# (experiment name, store URI) -> the experiment's id in that store, created if needed.
ExperimentMaker = Callable[[str, str], str]


@dataclass
class OutboxHooks:
    record_senders: dict[str, RecordSender] = field(default_factory=dict)
    make_experiment: ExperimentMaker | None = None


HOOKS = OutboxHooks()


def register_record_kind(kind: str, send: RecordSender) -> None:
    """Records whose ``op`` is ``kind`` are sent by ``send``, in their journal's order like the outbox's own; a
    ``path`` a record names among the outbox's copies (``Outbox.keep_copy``) is removed once it is sent."""
    HOOKS.record_senders[kind] = send


def set_experiment_maker(make: ExperimentMaker) -> None:
    HOOKS.make_experiment = make
