"""Everything that touches files and stores: dataset layouts and image reading, model and shard
files, the one atomic writer, and every MLflow call."""
