"""What each `reb` command does, callable from Python with the same settings object.

The commands layer sits on top of the single-process pipelines and the Ray layer: each function
takes the run's `RunConfig` (never edits it), parses what it needs once (method specs, the bank's
placement: in process or on Ray actors), opens the command's MLflow run, calls the pipelines (and
the Ray layer's searches, streams and actors), and owns what the command writes: the result table,
the files under `cfg.output_dir`, and everything logged to MLflow. `reb_dist.cli` and
`reb_dist.api` only parse and call these.

  fit        reb_dist.commands.fit        models (bank + densities + settings), logged as MLflow models
  evaluate   reb_dist.commands.evaluate   one model on its category's test set
  benchmark  reb_dist.commands.benchmark  every method x category
  predict    reb_dist.commands.predict    new images: scores.csv and overlays
  tune       reb_dist.commands.tune       per-class K / alpha / map on a validation split (Ray Tune)
  finetune   reb_dist.commands.finetune   DefectMaker fine-tuning (Ray Train) with its galleries and curves
  sweep      reb_dist.commands.sweep      datasets x categories x backbones as Ray tasks, resumable
"""
