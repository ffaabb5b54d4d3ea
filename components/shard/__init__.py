"""Shard step: images (bundled digits, an image folder, S3, or existing shards) -> webdataset shards."""
