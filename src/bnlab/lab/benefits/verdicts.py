"""How a claim is judged: paired comparisons, seed by seed, and the rule that turns them into a verdict.

The margins are fixed before any run and shared by every experiment that uses them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bnlab.config import check_choice
from bnlab.lab.benefits.arms import PLAIN, WITH_BN

VERDICTS = ("supported", "not supported", "mixed")

ACCURACY_MARGIN = 0.002  # 0.2 points: 10 of the 5,000 validation images
DEAD_MARGIN = 0.01  # one point of the hidden units
SPEEDUP_MARGIN = 1.1  # BN must get there in less than 1/1.1 of the time


@dataclass(frozen=True)
class Comparison:
    """One measured quantity, BN arm against a baseline arm, seed by seed (paired).

    The effect in a seed is ``bn - base`` (``kind="difference"``) or ``bn / base`` (``"ratio"``),
    turned round when lower values are better, so a positive difference or a ratio above 1 always
    favours BN. BN *wins* a seed when the effect exceeds ``margin``. The comparison **holds** when
    BN wins every seed, **fails** when it wins none, and is **inconsistent** otherwise. Comparisons
    with ``counts=False`` are reported but take no part in the verdict.
    """

    name: str
    bn: tuple[float, ...]
    base: tuple[float, ...]
    kind: str = "difference"
    higher_is_better: bool = True
    margin: float = 0.0
    baseline: str = PLAIN
    counts: bool = True

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, ("difference", "ratio"))
        if len(self.bn) != len(self.base) or not self.bn:
            raise ValueError(f"{self.name}: need one BN and one baseline value per seed")

    @classmethod
    def of_arms(cls, name: str, by_arm: Mapping[str, Sequence[float]], **options: Any) -> Comparison:
        """The BN arm against the plain one, from {arm name: one value per seed}."""
        return cls(name, bn=tuple(by_arm[WITH_BN]), base=tuple(by_arm[PLAIN]), **options)

    def effects(self) -> list[float]:
        out = []
        for bn, base in zip(self.bn, self.base, strict=True):
            better, worse = (bn, base) if self.higher_is_better else (base, bn)
            if self.kind == "difference":
                out.append(better - worse)  # inf - inf is NaN: no difference measurable
            elif worse == 0 or math.isinf(worse):
                out.append(math.inf if better > worse else 0.0 if better < worse else math.nan)
            else:
                out.append(better / worse)
        return out

    def wins(self) -> list[bool]:
        return [effect > self.margin for effect in self.effects()]  # NaN (no difference measurable) never wins

    @property
    def outcome(self) -> str:
        wins = self.wins()
        return "holds" if all(wins) else "fails" if not any(wins) else "inconsistent"

    def requirement(self) -> str:
        """The rule for one seed, in words."""
        if self.kind == "ratio":
            what = (
                f"{self.baseline}'s / {WITH_BN}'s" if not self.higher_is_better else f"{WITH_BN}'s / {self.baseline}'s"
            )
            return f"{what} > {self.margin:g}"
        sign = f"{WITH_BN} - {self.baseline}" if self.higher_is_better else f"{self.baseline} - {WITH_BN}"
        return f"{sign} > {self.margin:g}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "baseline": self.baseline,
            "bn": list(self.bn),
            "base": list(self.base),
            "effects": self.effects(),
            "wins": self.wins(),
            "requirement": self.requirement(),
            "outcome": self.outcome,
            "counts": self.counts,
        }


def verdict(comparisons: Sequence[Comparison]) -> str:
    """**supported** if every counted comparison holds; **not supported** if every one fails (or
    there is none: nothing showed a benefit); **mixed** otherwise."""
    outcomes = [c.outcome for c in comparisons if c.counts]
    if outcomes and all(o == "holds" for o in outcomes):
        return "supported"
    if all(o == "fails" for o in outcomes):
        return "not supported"
    return "mixed"
