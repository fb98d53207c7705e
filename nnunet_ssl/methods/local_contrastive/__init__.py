"""Local contrastive loss with pseudo-label based self-training (paper 004, Chaitanya et al.)."""
