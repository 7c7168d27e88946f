"""Training, data synthesis and evaluation code for TADiSR (not needed for inference)."""
