"""Composing runs from the library's parts: the built-in data a config names and everything a run needs
before its trainer (`prepare`: process group, device, data, tokenizer, run directory), a training run
(`train`) and the end-to-end demo (`demo`). The command line calls these; they call training, inference,
data and the model."""
