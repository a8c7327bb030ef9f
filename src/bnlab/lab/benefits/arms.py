"""The two arms of every comparison, and the lab that trains each network in both.

Every network the lab trains is trained twice per seed: once plain and once with batch norm, from
the same initial weights on the same batches. The arms are named here once; tables, figure legends
and comparisons all use these names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from bnlab.config import TrainConfig
from bnlab.lab.benefits.budgets import Budget
from bnlab.training import RunResult

PLAIN = "no BN"
WITH_BN = "BN"
ARMS = (PLAIN, WITH_BN)  # in this order everywhere: tables, legends (and so colours), job order

Lookup = Callable[[TrainConfig, str], list[RunResult]]  # (network, "none" or the BN mode) -> one run per seed
ArmRuns = dict[str, list[RunResult]]  # arm name -> one run per seed
SweepRuns = dict[str, list[list[RunResult]]]  # arm name -> for each swept value, one run per seed


@dataclass(frozen=True)
class Lab:
    """What every experiment is built for: the budget, the seeds and the BN mode of the BN arm."""

    budget: Budget
    seeds: tuple[int, ...]
    bn: str

    @property
    def norms(self) -> dict[str, str]:
        """Each arm's normalization, as ``TrainConfig.bn`` names it."""
        return {PLAIN: "none", WITH_BN: self.bn}

    def jobs(self, specs: Sequence[TrainConfig]) -> list[TrainConfig]:
        """Every network in both arms and every seed, in that order (the order the runs are trained in)."""
        return [
            spec.replace(bn=norm, seed=seed) for spec in specs for norm in self.norms.values() for seed in self.seeds
        ]

    def cost_setups(self, setups: Mapping[str, TrainConfig]) -> dict[str, dict[str, TrainConfig]]:
        """{setup: {arm: its network}}: what a claim's costs per step are measured on (seed 0; a step's cost
        depends on the network, not on its weights)."""
        return {
            name: {arm: spec.replace(bn=norm, seed=0) for arm, norm in self.norms.items()}
            for name, spec in setups.items()
        }

    def arms(self, get: Lookup, spec: TrainConfig) -> ArmRuns:
        return {arm: get(spec, norm) for arm, norm in self.norms.items()}

    def sweep(self, get: Lookup, specs: Sequence[TrainConfig]) -> SweepRuns:
        """The runs of ``specs`` (one network per swept value), arm by arm."""
        by_spec = [self.arms(get, spec) for spec in specs]
        return {arm: [runs[arm] for runs in by_spec] for arm in ARMS}
