"""Every name ctlpool gives a controller's exchanges and queues on the broker, derived from (prefix, controller).

Data flow: constants and strings in, names out; no I/O. ``pool.topology`` declares what these
name, ``pool.layout`` keeps the live partition count in ``Names.layout``, ``pool.resize`` locks
``Names.resize_lock``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .retries import tier_name

# Digits in partition queue names: p000 up to 1,000 partitions, p0000 up to 10,000, ... A
# controller declared with a count of another width has none of our names; the survey looks
# for these widths to tell it from an empty, interrupted declaration.
NAME_WIDTHS = range(3, 8)


def name_width(partitions: int) -> int:
    """Digits in the partition queue names of a controller with ``partitions`` partitions."""
    return max(NAME_WIDTHS[0], len(str(partitions - 1)))


@dataclass(frozen=True)
class Names:
    prefix: str
    controller: str

    @property
    def exchange(self) -> str:
        return f"{self.prefix}.{self.controller}"

    def partition(self, p: int, partitions: int) -> str:
        return self.partition_of_width(p, name_width(partitions))

    def partition_of_width(self, p: int, width: int) -> str:
        return f"{self.exchange}.p{p:0{width}d}"

    def clean_marker(self, p: int, partitions: int) -> str:
        """A transient exchange saying: this partition holds nothing routed by an earlier ring.

        Transient (non-durable) exchanges vanish when the broker restarts, exactly when the
        consistent-hash ring is rebuilt (DESIGN fact 1), so the marker lives as long as the
        ring that every message in the partition was routed by."""
        return f"{self.partition(p, partitions)}.clean"

    def tier(self, tier_s: float) -> str:
        """Both the fanout exchange and the TTL queue of a delay tier."""
        return f"{self.exchange}.delay.{tier_name(tier_s)}"

    @property
    def parked(self) -> str:
        return f"{self.exchange}.parked"

    @property
    def layout(self) -> str:
        """The queue holding the controller's live layout (``pool.layout``)."""
        return f"{self.exchange}.layout"

    @property
    def resize_lock(self) -> str:
        """The exclusive queue a running resize holds (``pool.resize``): gone with its connection."""
        return f"{self.exchange}.resize"


def members_exchange(prefix: str) -> str:
    return f"{prefix}.members"


