"""A model's plan: what built it and how it is used (the model record, the inference recipe, checkpoints)."""
