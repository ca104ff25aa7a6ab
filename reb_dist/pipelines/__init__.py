"""Single-process pipelines built on the core: fit, evaluate, predict, validation splits and the
pure part of K/alpha selection. The Ray layers in `reb_dist.distributed` run the same steps."""
