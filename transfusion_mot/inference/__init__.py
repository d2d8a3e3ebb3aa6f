"""Using a trained model: KV-cached sampling and captioning (`sampling`) and `Pipeline` (`pipeline`), the
model with its tokenizer and VAE, loaded from a run or a saved directory."""
