"""Collaborative feature learning: a CNN that predicts latent factors from images."""
