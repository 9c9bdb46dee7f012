"""Load balancing: the order in which deployments of equal priority are tried.

Weighted random by default (each deployment's share of first tries is its
weight over the group's total); least in-flight as an option. Either way
the whole group is ordered, so the deployments not picked first are the
fallbacks within the group.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Literal, Protocol, TypeVar

Strategy = Literal["weighted", "least_in_flight"]


class Weighted(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def weight(self) -> float: ...


T = TypeVar("T", bound=Weighted)


def weighted_order(group: Sequence[T], rng: random.Random) -> list[T]:
    """Weighted random sampling without replacement."""
    if len(group) == 1:
        return list(group)
    # Efraimidis-Spirakis: sort by u**(1/w); one pass, no re-normalising.
    return sorted(group, key=lambda d: rng.random() ** (1.0 / d.weight), reverse=True)


def least_in_flight_order(
    group: Sequence[T], in_flight: Mapping[str, int], rng: random.Random
) -> list[T]:
    """Fewest calls in flight per unit of weight first; ties broken at random."""
    if len(group) == 1:
        return list(group)
    return sorted(group, key=lambda d: (in_flight.get(d.name, 0) / d.weight, rng.random()))


def order(
    group: Sequence[T], strategy: Strategy, in_flight: Mapping[str, int], rng: random.Random
) -> list[T]:
    if strategy == "least_in_flight":
        return least_in_flight_order(group, in_flight, rng)
    return weighted_order(group, rng)
