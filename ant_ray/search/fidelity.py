"""Successive halving over the FID sample count (the merge stage's fidelities), as plain bookkeeping.

FID is biased by the sample count (FID_N is roughly linear in 1/N; Chong and Forsyth, CVPR 2020), so a score is
only meaningful beside scores of the same N. A `Ladder` keeps every score with its fidelity and only ever ranks
candidates within one rung: promotion ranks a rung by that rung's scores, and the winner is the best candidate of
the highest rung anyone reached, whatever lower fidelities said.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Hashable


def rung_sizes(num_candidates: int, rungs: int, reduction_factor: float) -> list[int]:
    """Candidates per rung: n, ceil(n / eta), ceil(n / eta^2), ... (at least one)."""
    if num_candidates < 1 or rungs < 1 or reduction_factor <= 1:
        raise ValueError("need num_candidates >= 1, rungs >= 1 and reduction_factor > 1")
    sizes = [num_candidates]
    for _ in range(rungs - 1):
        sizes.append(max(1, math.ceil(sizes[-1] / reduction_factor)))
    return sizes


@dataclass
class Rung:
    fidelity: int  # samples per FID
    scores: dict[Hashable, float] = field(default_factory=dict)  # candidate -> FID at this fidelity

    def ranked(self) -> list[Hashable]:
        """Best (lowest FID) first; a non-finite score (a diverged candidate) ranks last; ties keep insertion
        order, so candidates scored first (the anchors) win ties."""
        order = list(self.scores)
        return sorted(order, key=lambda c: (not math.isfinite(self.scores[c]), self.scores[c], order.index(c)))


class Ladder:
    """The rungs of one successive-halving run, lowest fidelity first."""

    def __init__(self, fidelities: list[int]):
        if not fidelities or any(a >= b for a, b in zip(fidelities, fidelities[1:])):
            raise ValueError(f"fidelities must be strictly increasing, got {fidelities}")
        self.rungs = [Rung(f) for f in fidelities]

    def record(self, rung: int, candidate: Hashable, fidelity: int, fid: float) -> None:
        """Record a score; the fidelity must be the rung's own (a score measured at another sample count is a
        different metric and must never enter this rung's ranking)."""
        if fidelity != self.rungs[rung].fidelity:
            raise ValueError(f"rung {rung} ranks FID at {self.rungs[rung].fidelity} samples; got a score at "
                             f"{fidelity}")
        if rung > 0 and candidate not in self.rungs[rung - 1].scores:
            raise ValueError(f"candidate {candidate!r} was not scored at rung {rung - 1}; it cannot be at rung {rung}")
        self.rungs[rung].scores[candidate] = float(fid)

    def promote(self, rung: int, count: int) -> list[Hashable]:
        """The ``count`` best candidates of ``rung``, ranked by that rung's scores only."""
        return self.rungs[rung].ranked()[:count]

    def top_rung(self) -> int:
        """The highest rung with any score."""
        scored = [i for i, r in enumerate(self.rungs) if r.scores]
        if not scored:
            raise ValueError("no candidate has been scored")
        return scored[-1]

    def best(self) -> tuple[Hashable, int, float]:
        """(candidate, fidelity, FID): the best of the highest rung reached."""
        rung = self.rungs[self.top_rung()]
        winner = rung.ranked()[0]
        return winner, rung.fidelity, rung.scores[winner]
