"""The CNN refresh: learn to predict each project's latent factor from its image."""
