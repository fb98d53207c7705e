"""One sub-package per published method: network pieces, losses as pure functions, the trainer."""
