"""ControlNet for the DiT (PixArt-delta): spatial conditioning of a frozen class-conditional DiT."""
