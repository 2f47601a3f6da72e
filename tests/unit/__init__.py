"""Tests of one layer's modules (real Redis, Stripe through localstripe, SQL where
the module needs them), one folder per layer."""
