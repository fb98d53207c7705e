"""The shared semi-supervised base trainer and its parts (ramp-ups, hyper-parameters, logging)."""
