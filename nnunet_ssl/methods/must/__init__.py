"""MuST: multi-scale consistency training with a stochastic perturbation module (paper 000)."""
