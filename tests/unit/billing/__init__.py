"""Tests of engine's or billing's billing layer."""
