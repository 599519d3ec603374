"""DTL's defaults, torch-free (the experiment schema resolves unset options through them)."""
from __future__ import annotations

#: beta, the sharpness of the Swish theta(u) = u * sigmoid(beta * u): the paper's value, on every backbone
PAPER_BETA = 100.0
