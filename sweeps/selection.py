"""Choosing a task's winner: the incumbent keeps its place unless a challenger beats it beyond chance.

The incumbent is the configuration the task trains with now (the sweep's first trial, which ASHA never stops).
A challenger replaces it only when it classifies the *same* validation images better by more than the noise of
a few hundred images: an exact McNemar test on the images the two models disagree on (one-sided, binomial with
p = 1/2), at level ``alpha`` with a Bonferroni correction over every challenger the sweep tried, so that a sweep
of many trials does not crown a lucky one. Among the challengers that pass, the one with the best val accuracy wins. With
no incumbent (the current configuration lies outside the space, or its trial failed), the best val accuracy wins
and the decision says that nothing was compared.

Per-image results travel between processes as :func:`encode_correct` strings (``"200:<hex>"``, 50 hex digits for
200 images), which fit in a Tune result and an MLflow tag.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

ALPHA = 0.05


def encode_correct(correct: Sequence[bool]) -> str:
    """Per-image correctness (dataset order) as ``"<count>:<hex of the packed bits>"``."""
    bits = np.asarray(correct, dtype=bool)
    return f"{bits.size}:{np.packbits(bits).tobytes().hex()}"


def decode_correct(text: str) -> np.ndarray:
    count, _, digits = text.partition(":")
    return np.unpackbits(np.frombuffer(bytes.fromhex(digits), dtype=np.uint8))[:int(count)].astype(bool)


def mcnemar_p_value(wins: int, losses: int) -> float:
    """One-sided exact McNemar test: P(at least ``wins`` of the ``wins + losses`` disagreements go to the challenger)
    if each disagreement were a fair coin flip."""
    from scipy.stats import binomtest

    if wins + losses == 0:
        return 1.0
    return float(binomtest(wins, wins + losses, 0.5, alternative="greater").pvalue)


@dataclass(frozen=True)
class Candidate:
    """A trial trained to the end: its val accuracy and which val images it got right."""

    trial_id: str
    val_accuracy: float
    correct: np.ndarray | None = None


@dataclass
class Comparison:
    """A challenger against the incumbent on the same images."""

    trial_id: str
    val_accuracy: float
    wins: int  # images the challenger gets right and the incumbent wrong
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
    margin: float | None = None  # winner's val accuracy minus the incumbent's
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
        best = max(challengers, key=lambda c: c.val_accuracy)
        return Decision(best.trial_id, None, False, "no incumbent to compare with: the best val accuracy wins",
                        alpha, alpha)
    if not challengers:
        return Decision(incumbent.trial_id, incumbent.trial_id, False, "no challenger trained to the end: kept",
                        alpha, alpha, margin=0.0)
    level = alpha / tried
    comparisons = []
    for challenger in challengers:
        if challenger.correct is None or incumbent.correct is None or \
                challenger.correct.shape != incumbent.correct.shape:
            raise ValueError(f"trials {incumbent.trial_id} and {challenger.trial_id} were scored on different "
                             "validation images; they cannot be compared")
        wins = int(np.sum(challenger.correct & ~incumbent.correct))
        losses = int(np.sum(~challenger.correct & incumbent.correct))
        p_value = mcnemar_p_value(wins, losses)
        comparisons.append(Comparison(challenger.trial_id, challenger.val_accuracy, wins, losses, p_value,
                                      p_value < level))
    passed = [c for c in comparisons if c.significant]
    if not passed:
        best = max(comparisons, key=lambda c: c.val_accuracy)
        return Decision(incumbent.trial_id, incumbent.trial_id, False,
                        f"no challenger beat the incumbent significantly (best: trial {best.trial_id}, "
                        f"+{best.wins}/-{best.losses} images, p = {best.p_value:.3g} >= {level:.3g}): kept",
                        alpha, level, margin=0.0, comparisons=comparisons)
    winner = max(passed, key=lambda c: (c.val_accuracy, c.wins - c.losses))
    return Decision(winner.trial_id, incumbent.trial_id, True,
                    f"trial {winner.trial_id} beat the incumbent on +{winner.wins}/-{winner.losses} images "
                    f"(p = {winner.p_value:.2g} < {level:.3g})",
                    alpha, level, margin=winner.val_accuracy - incumbent.val_accuracy, comparisons=comparisons)
