"""Data: the data sets this project makes (`shapes`, `emoji`, `folder` for your images, `corpus` for
English text), image folders on disk (`imageio`), readers of folders and WebDataset shards (`readers`),
latent caches (`latents`), one class per kind of training data behind one interface (`sources`), and the
resumable streams training draws from (`streams`). Model-free: nothing here imports the model or training."""
