"""The review loop: capture of live messages, their store, redaction and the review page."""
