"""``final``: VTAB-1K as the authors' scripts run it: train on all 1,000 images (train800val200), test once."""
from __future__ import annotations

from .base import register_protocol
from .vtab import VtabProtocol


@register_protocol
class FinalProtocol(VtabProtocol):
    name = "final"
    description = "VTAB-1K: train on train800val200, test once after the last epoch"
    train = "train800val200"
    scored = {"test": "test"}
    reported = {"test": "test"}
