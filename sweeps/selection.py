"""Choosing a task's winner: the incumbent keeps its place unless a challenger beats it beyond chance.

The incumbent is the configuration the task trains with now (the sweep's first trial, which ASHA never stops).
A challenger replaces it only when it scores the *same* validation images better by more than the noise of a few
hundred images: a one-sided exact sign test on the images where the two models' scores differ (binomial with
p = 1/2). For classification an image's score is whether it was classified correctly, and the test is the exact
McNemar test on the images the two models disagree on; for segmentation it is the image's mean IoU. The test runs
at level ``alpha`` with a Bonferroni correction over every challenger the sweep tried, so that a sweep of many
trials does not crown a lucky one. Among the challengers that pass, the one with the best val score (accuracy;
mIoU for segmentation) wins. With no incumbent (the current configuration lies outside the space, or its trial
failed), the best val score wins and the decision says that nothing was compared.

Per-image scores travel between processes as :func:`encode_scores` strings, which fit in a Tune result and an
MLflow tag: ``"200:<hex>"`` (packed bits, 50 hex digits for 200 images) for right/wrong, ``"200:q:<hex>"``
(scores in [0, 1] rounded to 1/255, a byte each) for segmentation.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.stats import binomtest

ALPHA = 0.05


def encode_scores(scores: Sequence[bool] | Sequence[float]) -> str:
    """Per-image scores (dataset order) as text: right/wrong as ``"<count>:<hex of the packed bits>"``, scores in
    [0, 1] as ``"<count>:q:<hex of one byte each>"``."""
    values = np.asarray(scores)
    if values.dtype == bool:
        return f"{values.size}:{np.packbits(values).tobytes().hex()}"
    quantised = np.rint(np.clip(values.astype(np.float64), 0, 1) * 255).astype(np.uint8)
    return f"{values.size}:q:{quantised.tobytes().hex()}"


def decode_scores(text: str) -> np.ndarray:
    count, _, digits = text.partition(":")
    if digits.startswith("q:"):
        return np.frombuffer(bytes.fromhex(digits[2:]), dtype=np.uint8)[:int(count)].astype(np.float64) / 255
    return np.unpackbits(np.frombuffer(bytes.fromhex(digits), dtype=np.uint8))[:int(count)].astype(bool)


def sign_test_p_value(wins: int, losses: int) -> float:
    """One-sided exact sign test: P(at least ``wins`` of the ``wins + losses`` images that differ go to the
    challenger) if each were a fair coin flip (for right/wrong scores: the exact McNemar test)."""
    if wins + losses == 0:
        return 1.0
    return float(binomtest(wins, wins + losses, 0.5, alternative="greater").pvalue)


@dataclass(frozen=True)
class Candidate:
    """A trial trained to the end: its val score and each val image's score."""

    trial_id: str
    val_score: float
    per_image: np.ndarray | None = None


@dataclass
class Comparison:
    """A challenger against the incumbent on the same images."""

    trial_id: str
    val_score: float
    wins: int  # images the challenger scores higher than the incumbent (classification: right where it was wrong)
    losses: int  # the reverse
    p_value: float
    significant: bool


@dataclass
class Decision:
    winner: str | None  # trial id; None: no candidate at all
    incumbent: str | None
    replaced: bool  # a challenger beat the incumbent
    reason: str
    alpha: float = ALPHA
    level: float = ALPHA  # alpha after the Bonferroni correction
    margin: float | None = None  # winner's val score minus the incumbent's
    comparisons: list[Comparison] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def choose_winner(incumbent: Candidate | None, challengers: Sequence[Candidate], alpha: float = ALPHA,
                  tried: int | None = None) -> Decision:
    """The incumbent unless a challenger beats it significantly on the same images (see the module docstring).

    ``challengers`` are the trials trained to the end; ``tried`` is how many challengers the sweep tried in all
    (those ASHA stopped or that failed included: surviving the rungs is a selection too), the Bonferroni divisor;
    default ``len(challengers)``."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    tried = max(tried or 0, len(challengers))
    if incumbent is None:
        if not challengers:
            return Decision(None, None, False, "no trial trained to the end", alpha, alpha)
        best = max(challengers, key=lambda c: c.val_score)
        return Decision(best.trial_id, None, False, "no incumbent to compare with: the best val score wins",
                        alpha, alpha)
    if not challengers:
        return Decision(incumbent.trial_id, incumbent.trial_id, False, "no challenger trained to the end: kept",
                        alpha, alpha, margin=0.0)
    level = alpha / tried
    comparisons = []
    for challenger in challengers:
        if challenger.per_image is None or incumbent.per_image is None or \
                challenger.per_image.shape != incumbent.per_image.shape:
            raise ValueError(f"trials {incumbent.trial_id} and {challenger.trial_id} were scored on different "
                             "validation images; they cannot be compared")
        mine, theirs = challenger.per_image.astype(np.float64), incumbent.per_image.astype(np.float64)
        wins, losses = int(np.sum(mine > theirs)), int(np.sum(mine < theirs))
        p_value = sign_test_p_value(wins, losses)
        comparisons.append(Comparison(challenger.trial_id, challenger.val_score, wins, losses, p_value,
                                      p_value < level))
    passed = [c for c in comparisons if c.significant]
    if not passed:
        best = max(comparisons, key=lambda c: c.val_score)
        return Decision(incumbent.trial_id, incumbent.trial_id, False,
                        f"no challenger beat the incumbent significantly (best: trial {best.trial_id}, "
                        f"+{best.wins}/-{best.losses} images, p = {best.p_value:.3g} >= {level:.3g}): kept",
                        alpha, level, margin=0.0, comparisons=comparisons)
    winner = max(passed, key=lambda c: (c.val_score, c.wins - c.losses))
    return Decision(winner.trial_id, incumbent.trial_id, True,
                    f"trial {winner.trial_id} beat the incumbent on +{winner.wins}/-{winner.losses} images "
                    f"(p = {winner.p_value:.2g} < {level:.3g})",
                    alpha, level, margin=winner.val_score - incumbent.val_score, comparisons=comparisons)
