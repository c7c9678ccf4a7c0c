"""Evaluation: FID / KID / IS / precision-recall, Inception, the per-dataset classifier."""
