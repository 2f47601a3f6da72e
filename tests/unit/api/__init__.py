"""Tests of engine's or billing's api layer."""
