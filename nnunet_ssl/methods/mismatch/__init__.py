"""MisMatch: learnt morphological feature perturbations for calibrated semi-supervised segmentation (paper 003)."""
