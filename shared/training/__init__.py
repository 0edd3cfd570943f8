"""Training a CNN on image targets: shared by the CNN refresh (targets from latent factors)
and the evaluation (baselines trained on other targets), which may not import each other."""
