"""Continual pretraining: mixture laws, vocabulary expansion, document scores. Its schedules are
in jaxlm.optim.schedules; replay is a DataConfig mixture."""

# Importing registers the gin configurables: the expand_vocabulary transition, scored_documents.
from jaxlm.methods.continual import document_scores, vocab_expansion  # noqa: F401
