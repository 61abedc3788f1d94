"""msf_scale: train MSF-Mamba video models from WebDataset shards, one CPU to many GPUs."""
__version__ = "0.1.0"
