"""Contrastive ranking (TMCR sec. 3.3): balanced index, traversal loss, E_CR, its pretraining."""
