"""Tests of engine's or billing's bench layer."""
