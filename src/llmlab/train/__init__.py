"""Training: the one loop, checkpoints, distributed, objectives, scaling sweep."""
