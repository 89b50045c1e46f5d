"""Staged training: TOML recipes, the engine (single process or FSDP2 under torchrun), checkpoints."""
