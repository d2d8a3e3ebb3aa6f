"""Training a MoT: the trainer built from a run config's sections and its short loop (`trainer`), the sample
stream and batches (`stream`), held-out losses (`validation`), the optimizer, schedule and EMA (`optim`),
parallelism applied from outside the model (`parallel`) and loss curves (`curves`). The run directory and
its checkpoints belong to `transfusion_mot.run_dir`; a run is prepared and started by
`transfusion_mot.recipes.train`."""
