"""Evaluate step: score generated samples with a classifier trained on the real data."""
