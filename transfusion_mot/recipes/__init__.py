"""Composing runs from the library's parts: the built-in data a config names (`prepare`), a training run
(`train`: data, model, stream, optimizer, checkpoints, then the loop) and the end-to-end demo (`demo`). The
command line calls these; they call training, inference, data and the model."""
