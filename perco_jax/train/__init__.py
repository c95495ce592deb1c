"""The training loop shared by both stages."""
