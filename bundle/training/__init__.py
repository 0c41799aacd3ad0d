"""Training: losses, Ignite handlers, datasets and exact resume, the 2-D slice pipeline, the slice gate's targets."""
