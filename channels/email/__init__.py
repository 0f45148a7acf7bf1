"""Email: the IMAP poller, parsing and authenticating a mail, turning it into a
job, and the SMTP delivery of the threaded reply."""
