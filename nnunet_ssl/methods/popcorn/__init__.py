"""POPCORN: progressive pseudo-labeling with consistency regularization and neighboring (paper 002)."""
