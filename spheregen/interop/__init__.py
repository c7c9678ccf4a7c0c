"""Interoperability with the authors' code: safe loading of their pickled checkpoints, `hf:` Hub paths,
and converters into ordinary spheregen checkpoint directories (SphereAR .pt, Sphere Encoder .pth)."""
