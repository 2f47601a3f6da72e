"""Tests of engine's or billing's routing layer."""
