"""Bulk captioning: a set of images (folders, lists, WebDataset shards) captioned as one resumable, idempotent job
shared out over the processes Lightning launches (`job`), read a part at a time (`inputs`), written as `.txt`
sidecars, JSON Lines, Parquet or WebDataset shards (`outputs`)."""
