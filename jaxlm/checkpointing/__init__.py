"""Checkpoints: saving and reading them with the run's record (checkpoint.py), and starting a
stage from another run's checkpoint (restore.py)."""
