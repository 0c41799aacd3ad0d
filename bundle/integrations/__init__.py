"""Entry points and ecosystems: the command line, the model-zoo export, cross-validation, MONAI Label."""
