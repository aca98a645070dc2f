"""Test controllers without a broker: ``Harness`` runs them on the worker's own rooms, an in-memory
broker and a virtual clock; the pytest plugin (``pool.testing.plugin``, registered by the package)
gives a test the ``ctlpool`` fixture::

    def test_it_converges(ctlpool):
        h = ctlpool(Deployments())
        h.publish("deployments", "web", {"image": "v1"})
        h.run_until_idle()
        assert [r.outcome for r in h.reconciles_of("web")] == ["requeue_after", "converged"]

``pool.testing.broker`` is the in-memory broker itself (the worker's unit tests use it directly).
"""

from .harness import Harness, HarnessTimeout, Parked, Published, Reconcile

__all__ = ["Harness", "HarnessTimeout", "Parked", "Published", "Reconcile"]
