"""Shared building blocks for DINO and MAE pretraining and the DINO evaluation suite."""
