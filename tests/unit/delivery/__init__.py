"""Tests of engine's or billing's delivery layer."""
