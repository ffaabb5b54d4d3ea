"""The DiT's architectures by name, the keys of ``dit.preset``. Plain data, no torch: the config
checks a preset and its shapes at load."""

# depth, hidden_size, num_heads per the DiT paper (Table 1); patch size from the key.
_DIT_SIZES = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}
DIT_PRESETS: dict[str, dict] = {
    f"DiT-{size}/{patch}": dict(cfg, patch_size=patch)
    for size, cfg in _DIT_SIZES.items()
    for patch in (2, 4, 8)
}
# CPU-sized presets for tests and the MNIST recipe.
DIT_PRESETS["DiT-Tiny/2"] = dict(depth=6, hidden_size=192, num_heads=3, patch_size=2)
DIT_PRESETS["DiT-Micro/2"] = dict(depth=2, hidden_size=64, num_heads=2, patch_size=2)
