"""Inception reference stage: the real images' FID/KID features, computed once per dataset version."""
