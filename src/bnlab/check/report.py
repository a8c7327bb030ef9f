"""What ``check_model`` returns: findings, the cost of the stored statistics, and the verdict, as text or JSON."""

from __future__ import annotations

import textwrap
from dataclasses import asdict, dataclass, field
from typing import Any

from bnlab.check.rules import (
    ACCURACY_LOSS,
    CHANGED_LIMIT,
    ERROR,
    ERROR_SHARE,
    INFO,
    NOISE_FACTOR,
    NOISE_Z,
    OUTPUT_LIMIT,
    RULES,
    WARNING,
    Rule,
)

__all__ = ["Finding", "Report", "StatisticsCost"]


@dataclass(frozen=True)
class Finding:
    """One problem: which rule, where (a BN layer's name, or None for the whole model), and the numbers."""

    code: str
    layer: str | None = None
    evidence: str = ""

    @property
    def rule(self) -> Rule:
        return RULES[self.code]

    @property
    def severity(self) -> str:
        return self.rule.severity

    def to_dict(self) -> dict[str, Any]:
        rule = self.rule
        return {
            "code": self.code,
            "severity": rule.severity,
            "layer": self.layer,
            "title": rule.title,
            "evidence": self.evidence,
            "explanation": rule.explanation,
            "fix": rule.fix,
        }


@dataclass(frozen=True)
class StatisticsCost:
    """Held-out inputs scored with the stored statistics and with statistics recomputed from other inputs.

    ``metric``: "accuracy" (``stored`` and ``recomputed`` are accuracies, ``loss`` their difference and
    ``noise`` its paired standard error), "changed predictions" (``loss``: the share that changes) or
    "output change" (``loss``: how far the outputs move, relative to their spread); for these two,
    ``noise`` is the same measure between two recomputations. ``limit``: the loss above which the
    statistics are stale (rules.py says why).
    """

    metric: str
    loss: float
    limit: float
    stored: float | None = None
    recomputed: float | None = None
    noise: float | None = None

    @property
    def stale(self) -> bool:
        return self.loss > self.limit

    def describe(self) -> str:
        """One line, as the report and the stale-stats evidence give it."""
        if self.metric == "accuracy":
            return (
                f"accuracy {self.stored:.3f} with the stored statistics, {self.recomputed:.3f} recomputed: "
                f"{self.loss * 100:.1f} points lost (stale above {self.limit * 100:.1f}: the largest of "
                f"{ACCURACY_LOSS * 100:g} point, {ERROR_SHARE:.0%} of the errors with recomputed statistics and "
                f"{NOISE_Z:g} x the paired noise {self.noise * 100:.2f})"
            )
        if self.metric == "changed predictions":
            form, floor, what = ".1%", f"{CHANGED_LIMIT:.0%}", "of the predictions change"
        else:
            form, floor, what = ".3f", f"{OUTPUT_LIMIT:g}", "is how far the outputs move (relative to their spread)"
        moved, noise, limit = (format(value, form) for value in (self.loss, self.noise, self.limit))
        return (
            f"{moved} {what} with recomputed statistics, {noise} between two recomputations "
            f"(stale above {limit}: the larger of {floor} and {NOISE_FACTOR:g} x that)"
        )


@dataclass
class Report:
    """What ``check_model`` found. ``passed``: no errors (warnings allowed).

    ``samples``: inputs scored alone and in a batch; ``stats_samples``: inputs the statistics were
    recomputed from; ``held_out``: other inputs scored with the stored and the recomputed statistics
    (``cost``: the comparison, None without BN layers that keep statistics); ``seconds``: the check's time.
    """

    layers: list[str]  # the BN layers, by name
    samples: int
    stats_samples: int
    held_out: int
    findings: list[Finding] = field(default_factory=list)
    cost: StatisticsCost | None = None
    seconds: float = 0.0

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == WARNING]

    @property
    def notes(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == INFO]

    @property
    def passed(self) -> bool:
        return not self.errors

    @property
    def verdict(self) -> str:
        """ "fail" (an error), "pass", or "no-batch-norm": nothing wrong, but no BN layer was there to check."""
        if self.errors:
            return "fail"
        return "pass" if self.layers else "no-batch-norm"

    def codes(self) -> set[str]:
        return {f.code for f in self.findings}

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "verdict": self.verdict,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "notes": len(self.notes),
            "layers": self.layers,
            "samples": self.samples,
            "stats_samples": self.stats_samples,
            "held_out": self.held_out,
            "cost": None if self.cost is None else asdict(self.cost),
            "seconds": round(self.seconds, 3),
            "findings": [f.to_dict() for f in self.findings],
        }

    def format(self, width: int = 100) -> str:
        """Plain text: what was checked, a paragraph per kind of finding with the layers concerned, the verdict."""
        count = f"{len(self.layers)} batch-norm layers" if self.layers else "no batch-norm layer"
        lines = [f"{count}; {self.samples} samples scored alone and in a batch; checked in {self.seconds:.1f} s"]
        if self.cost is not None:
            lines.append(
                f"statistics recomputed from {self.stats_samples} inputs, {self.held_out} others held out: "
                + self.cost.describe()
            )
        found = [code for code in RULES if code in self.codes()]
        for code in found:
            group = [f for f in self.findings if f.code == code]
            rule = group[0].rule
            lines += ["", f"{rule.severity.upper()} {code}: {rule.title}"]
            if any(f.evidence for f in group):
                lines += [f"  {f.layer or 'model'}: {f.evidence}" for f in group]
            else:
                names = [f.layer or "model" for f in group]
                shown = names if len(names) <= 5 else [*names[:3], "...", names[-1]]
                lines.append("  " + ", ".join(shown) + (f" ({len(names)} layers)" if len(names) > 1 else ""))
            for paragraph in (rule.explanation, f"Fix: {rule.fix}"):
                lines.append(textwrap.fill(paragraph, width, initial_indent="  ", subsequent_indent="  "))
        lines += ["", self._verdict_line(found)]
        return "\n".join(lines)

    def _verdict_line(self, found: list[str]) -> str:
        errors = [code for code in found if RULES[code].severity == ERROR]
        warnings = [code for code in found if RULES[code].severity == WARNING]
        notes = [code for code in found if RULES[code].severity == INFO]
        note = f"; info: {', '.join(notes)}" if notes else ""
        if errors:
            line = f"FAIL: errors: {', '.join(errors)}"
            return line + (f"; warnings: {', '.join(warnings)}" if warnings else "") + note
        if not self.layers:
            return (
                "NO BATCH NORM: the model has no batch-norm layer, so there is nothing to check "
                "(predictions do not depend on the batch)"
            )
        verdict = f"PASS: warnings: {', '.join(warnings)}" if warnings else "PASS: batch norm is used correctly"
        return verdict + note
