"""Model-free building blocks shared by every package of the project (`transfusion_mot`, `vae`, `eval`):
the project's error types, strict configs, one checkpointer, one learning-rate schedule, JSON/JSONL files,
image grids and sample folders, device choice and command-line helpers. Nothing here imports the model,
the training loop or the data sets, so `vae` and `eval` can use it without depending on training code."""
