"""Tests of engine's or billing's store layer."""
