"""What the agent sends and receives: the one MQTT link, the signed outbox over the durable spool (kept until
the controller's watermark covers it), what is reported when, and refused input in bounded form."""
