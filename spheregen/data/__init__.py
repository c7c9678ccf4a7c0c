"""Datasets (image arrays, folders) and the latent cache."""
