"""Tests of engine's or billing's obs layer."""
