"""Observing the host: posture probes, the observe rounds, and the proc-connector events that trigger them."""
