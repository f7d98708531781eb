"""Decisions: pure functions with no I/O. ``judge`` turns a posture and the policy into a verdict, ``decide``
turns a verdict and the endpoint's state into actions. The desktop state machine is ``desktops.machine``."""
