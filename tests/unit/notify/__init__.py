"""Tests of engine.notify: templates, the SMTP transport and the outbox."""
