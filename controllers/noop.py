"""A controller that does nothing: the bench's load target and the smallest example."""

from pool import Controller


class Noop(Controller):
    name = "noop"

    async def reconcile(self, key, event, ctx):
        return None
