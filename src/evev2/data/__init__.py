"""Data: image preprocessing, the synthetic world, templates and datasets."""
