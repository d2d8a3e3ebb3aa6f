"""Training a MoT: the loop (`trainer`), its sample stream (`stream`), held-out losses (`validation`), the
optimiser pieces (`optim`), checkpoint parts (`state`), parallelism applied from outside the model
(`parallel`), and metrics and their curves (`metrics`, `curves`). A run is composed from these parts by
`transfusion_mot.recipes.train`."""
