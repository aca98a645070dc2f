"""Example controllers bundled with ctlpool."""
