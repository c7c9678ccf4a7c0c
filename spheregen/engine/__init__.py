"""Training: the loop, distributed plumbing, and one training-setup module per model."""
