"""Training data: Real-ESRGAN-style degradation, FTSR-style text synthesis and torch Datasets."""
