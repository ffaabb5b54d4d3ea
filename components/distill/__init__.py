"""Distillation into fast samplers (issue 5): progressive distillation and consistency models."""
