"""Inference: flip TTA and slice inferers, the slice gate, probabilities -> labels, clean-up, writers, the run."""
