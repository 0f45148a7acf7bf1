"""WhatsApp through Twilio: the SMS channel's guarantees, with WhatsApp's limits and formatting."""
