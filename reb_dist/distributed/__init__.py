"""Thin Ray layers around the pure core: data pipelines, training, bank shards, searches."""
