"""Training: config, data (token shards), trainer, checkpoint, distributed."""
