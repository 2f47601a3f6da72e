"""Tests that run the engine: real HTTP, processes, workers, the whole path."""
