"""Finding, checking and preprocessing unlabeled images; labeled-fraction experiments."""
