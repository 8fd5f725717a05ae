"""Evaluation of pretrained backbones: feature extraction, weighted k-NN, linear probe (spec 5)."""
