"""Continual pretraining (METHODS.md §A): mixture laws, vocabulary expansion, document scores.
Its schedules are in jaxlm.optim.schedules; replay is a DataConfig mixture."""
