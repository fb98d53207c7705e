"""Evaluation helpers beyond nnU-Net's own."""
