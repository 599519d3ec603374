"""``val``: VTAB's rule for choosing hyperparameters: train on train800 and score val200, so the test split is
never used to choose anything (it is reported for reference only). A sweep's trials under ``final`` follow it."""
from __future__ import annotations

from .base import register_protocol
from .vtab import VtabProtocol


@register_protocol
class ValProtocol(VtabProtocol):
    name = "val"
    description = "VTAB-1K: train on train800, score val200 (test reported for reference)"
    train = "train800"
    scored = {"val": "val200"}
    reported = {"val": "val200", "test": "test"}
