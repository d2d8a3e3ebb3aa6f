"""Model-free building blocks shared by every package of the project (`transfusion_mot`, `vae`, `eval`):
the project's error types, strict configs, one checkpointer and the tensors it saves, one learning-rate
schedule, the pieces every training loop shares (metrics log, progress bar, stop request, throughput),
the process group, torch.compile of a model's blocks, JSON/JSONL files, image grids, device choice, hub
snapshots and command-line helpers.
Nothing here imports the model, the training loop or the data sets, so `vae` and `eval` can use it
without depending on training code."""
