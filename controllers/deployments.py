"""Two example controllers that drive each other, like a tiny Kubernetes: ``Deployments`` and ``Instances``.

Data flow (both level-triggered: an event only says "look at this key"; the store says what is)::

    user writes spec ──> store.deployments ──event──> Deployments.reconcile(name)
        creates / updates / marks terminating the rows of instances <name>-0 … <name>-{replicas-1}
        ──ctx.publish("instances", key)──> Instances.reconcile(key)
            provisions the row's image on a slow, flaky Provider (failures raise: the pool retries),
            marks it ready (or deletes it when terminating)
            ──ctx.publish("deployments", name)──> Deployments.reconcile(name)
        rolls up status (ready instances at the desired image); requeues itself until converged

Every write is version-checked (``controllers.store``): a reconcile that acted on a stale
row raises ``Conflict`` and is retried with backoff, so it can never undo a newer decision.
Both reconciles are plain ``def`` (the store blocks), so they run in the worker's threads
and call ``ctx.publish`` without ``await``.
"""

from __future__ import annotations

import os
import random
import time
from typing import Callable

import msgspec

from pool import Context, Controller, Result, RetryPolicy

from .store import AVAILABLE, PENDING, PROGRESSING, READY, TERMINATING, Deployment, Instance, Store, open_store

ENV_FAIL_RATE = "CTLPOOL_DEMO_FAIL_RATE"
ENV_PROVIDER_MS = "CTLPOOL_DEMO_PROVIDER_MS"
DEFAULT_FAIL_RATE = 0.2
DEFAULT_PROVIDER_MS = 20.0  # slow enough to see reconciles overlap, fast enough for a 5-second demo

REQUEUE_S = 4.0  # while not converged, look again this often: one ride on the 4 s delay tier
RESYNC_S = 30.0  # re-send the event of an instance that has been pending this long (a lost nudge)

# Demo-sized backoff: retries after ~1, 2, 4, 4… s, so a streak of bad luck costs seconds, not
# minutes; ten provider failures in a row (0.2**10: one in ten million) park it.
DEMO_RETRY = RetryPolicy(base_s=1, max_delay_s=4, max_attempts=10)


class DeploymentEvent(msgspec.Struct, omit_defaults=True):
    """A nudge for a deployment: why, and which instance changed, if one did."""

    reason: str = ""
    instance: str = ""


class InstanceEvent(msgspec.Struct, omit_defaults=True):
    """A nudge for an instance; ``deployment`` tells operators whose it is."""

    deployment: str
    reason: str = ""


class ProviderError(Exception):
    """The simulated provider failed transiently; the pool retries the reconcile."""


class Provider:
    """A slow, sometimes failing infrastructure API, simulated: sleeps, then fails with ``fail_rate``."""

    def __init__(self, *, latency_s: float, fail_rate: float,
                 rand: Callable[[], float] = random.random, sleep: Callable[[float], None] = time.sleep) -> None:
        self.latency_s = latency_s
        self.fail_rate = fail_rate
        self.rand = rand
        self.sleep = sleep

    @classmethod
    def from_env(cls) -> "Provider":
        return cls(latency_s=float(os.environ.get(ENV_PROVIDER_MS, DEFAULT_PROVIDER_MS)) / 1000,
                   fail_rate=float(os.environ.get(ENV_FAIL_RATE, DEFAULT_FAIL_RATE)))

    def call(self, action: str, key: str) -> None:
        self.sleep(self.latency_s * (0.5 + self.rand()))  # latency spread over 0.5–1.5×
        if self.rand() < self.fail_rate:
            raise ProviderError(f"{action} {key}: provider timed out (simulated)")


def instance_key(deployment: str, ordinal: int) -> str:
    return f"{deployment}-{ordinal}"


class Deployments(Controller):
    """Keeps a deployment's instances at its spec and rolls their state up into its status."""

    name = "deployments"
    event_type = DeploymentEvent
    retry = DEMO_RETRY

    def setup(self) -> None:
        self.store: Store = open_store()

    def reconcile(self, key: str, event: DeploymentEvent, ctx: Context) -> Result | None:
        d = self.store.get(Deployment, key)
        have = {i.ordinal: i for i in self.store.instances(key)}
        for inst, reason in self._align(key, d, have):
            ctx.publish("instances", inst.key, InstanceEvent(deployment=key, reason=reason))
        if d is None:
            return None  # deleted: its instances are terminating and will remove themselves
        ready = sum(1 for o, i in have.items() if o < d.replicas and i.state == READY and i.running == d.image)
        converged = ready == d.replicas and len(have) == d.replicas
        status = AVAILABLE if converged else PROGRESSING
        if (d.observed_generation, d.instances, d.ready, d.status) != (d.generation, len(have), ready, status):
            self.store.update(d, observed_generation=d.generation, instances=len(have), ready=ready, status=status)
        return None if converged else Result(requeue_after=REQUEUE_S)

    def _align(self, name: str, d: Deployment | None, have: dict[int, Instance]) -> list[tuple[Instance, str]]:
        """Write each instance row toward the spec (``have`` is updated in place); the rows to nudge, and why."""
        want, image = (d.replicas, d.image) if d is not None else (0, "")
        stale_before = self.store.clock() - RESYNC_S
        nudges = []
        for ordinal, inst in sorted(have.items()):
            if ordinal >= want and inst.state != TERMINATING:
                have[ordinal] = self.store.update(inst, state=TERMINATING)
                nudges.append((have[ordinal], "delete"))
        for ordinal in range(want):
            inst = have.get(ordinal)
            if inst is None:
                have[ordinal] = self.store.insert(Instance(instance_key(name, ordinal), name, ordinal, image))
                nudges.append((have[ordinal], "create"))
            elif inst.image != image or inst.state == TERMINATING:
                have[ordinal] = self.store.update(inst, image=image, state=PENDING, attempts=0)
                nudges.append((have[ordinal], "update"))
            elif inst.state == PENDING and inst.updated_at < stale_before:
                nudges.append((inst, "resync"))
        return nudges


class Instances(Controller):
    """Provisions (or deprovisions) one instance on the provider, then tells its deployment."""

    name = "instances"
    event_type = InstanceEvent
    retry = DEMO_RETRY

    def setup(self) -> None:
        self.store: Store = open_store()
        self.provider = Provider.from_env()

    def reconcile(self, key: str, event: InstanceEvent, ctx: Context) -> None:
        inst = self.store.get(Instance, key)
        if inst is None or (inst.state == READY and inst.running == inst.image):
            return None  # gone, or already what it should be
        action = "deprovision" if inst.state == TERMINATING else "provision"
        try:
            self.provider.call(action, key)
        except ProviderError:
            self.store.update(inst, attempts=inst.attempts + 1)  # a Conflict here retries just the same
            raise
        if inst.state == TERMINATING:
            self.store.delete(inst)
        else:
            self.store.update(inst, state=READY, running=inst.image)
        ctx.publish("deployments", inst.deployment, DeploymentEvent(reason=action, instance=key))
        return None
