"""SMS and WhatsApp through Twilio: the signed webhook, per-sender state, the
spool for Redis outages, splitting long answers, and delivery of the reply."""
