"""The lowest layer: facts, errors, money, key names, the config's Structs.

Imports nothing of leadflow's above it (docs/architecture.md)."""
