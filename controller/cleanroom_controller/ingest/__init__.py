"""Ingest: the MQTT link (with ``$share`` groups and acknowledgement after commit), the fair inbox, the
verify → dedup → store pipeline with its reject windows and junk budgets, and the watermarks sent back to the
agents. See docs/data-path.md for one event's way through these modules.

Nothing is imported here, so that importing one part does not pull in the others."""
