"""Optimizers and learning-rate schedules, each a gin-configurable factory."""
