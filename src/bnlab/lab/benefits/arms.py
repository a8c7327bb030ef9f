"""The two arms of every comparison, and the lab that trains each network in both.

Every network the lab trains is trained twice per seed: once plain and once with batch norm, from
the same initial weights on the same batches. The arms are named here once; tables, figure legends
and comparisons all use these names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bnlab.lab.benefits.budgets import Budget
from bnlab.lab.benefits.runs import Job, Run, RunSpec

PLAIN = "no BN"
WITH_BN = "BN"
ARMS = (PLAIN, WITH_BN)  # in this order everywhere: tables, legends (and so colours), job order

Lookup = Callable[[RunSpec, str], list[Run]]  # (spec, "none" or the BN mode) -> one run per seed
ArmRuns = dict[str, list[Run]]  # arm name -> one run per seed
SweepRuns = dict[str, list[list[Run]]]  # arm name -> for each swept value, one run per seed


@dataclass(frozen=True)
class Lab:
    """What every experiment is built for: the budget, the seeds and the BN mode of the BN arm."""

    budget: Budget
    seeds: tuple[int, ...]
    bn: str

    @property
    def norms(self) -> dict[str, str]:
        """Each arm's normalization, as ``train_run`` names it."""
        return {PLAIN: "none", WITH_BN: self.bn}

    def jobs(self, specs: Sequence[RunSpec]) -> list[Job]:
        """Every spec in both arms and every seed, in that order (the order the runs are trained in)."""
        return [Job(spec, norm, seed) for spec in specs for norm in self.norms.values() for seed in self.seeds]

    def arms(self, get: Lookup, spec: RunSpec) -> ArmRuns:
        return {arm: get(spec, norm) for arm, norm in self.norms.items()}

    def sweep(self, get: Lookup, specs: Sequence[RunSpec]) -> SweepRuns:
        """The runs of ``specs`` (one network per swept value), arm by arm."""
        by_spec = [self.arms(get, spec) for spec in specs]
        return {arm: [runs[arm] for runs in by_spec] for arm in ARMS}
