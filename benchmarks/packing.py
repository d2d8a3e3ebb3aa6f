"""Padding of packed micro-batches (`PackedBatches`, the trainer's own packer) on samples shaped like the
coco-760m recipe: captions of 5-60 tokens before or after a 32x32 latent in 2x2 patches (256 image tokens),
20% image-first, optionally mixed with text-only documents of up to a whole row. Rows of `--budget` tokens,
`--rows` per micro-batch; reports padding and samples per micro-batch. The last line is one JSON object.

    python benchmarks/packing.py [--rows 8 --budget 4096 --text-only 0.1 --batches 200]
"""

from __future__ import annotations

import argparse
import json

import torch

from transfusion_mot.batch import Collator, Sample
from transfusion_mot.config import ModelConfig
from transfusion_mot.training.stream import PackedBatches


class SyntheticSamples:
    """A sample stream (`next_samples`, as `TrainingStream`) of coco-760m-like lengths, seeded."""

    def __init__(self, config: ModelConfig, latent: int = 32, text_only: float = 0.0, max_doc: int = 4094,
                 seed: int = 0) -> None:
        self.config, self.latent, self.text_only, self.max_doc = config, latent, text_only, max_doc
        self.g = torch.Generator().manual_seed(seed)

    def _ids(self, low: int, high: int) -> list[int]:
        n = int(torch.randint(low, high + 1, (1,), generator=self.g))
        return torch.randint(0, self.config.vocab_size - 5, (n,), generator=self.g).tolist()

    def next_samples(self, n: int) -> list[Sample]:
        out = []
        for _ in range(n):
            if torch.rand(1, generator=self.g) < self.text_only:
                out.append(Sample([self._ids(50, self.max_doc)]))
                continue
            caption = self._ids(5, 60)
            image = torch.zeros(self.config.latent_channels, self.latent, self.latent)
            out.append(Sample([image, caption] if torch.rand(1, generator=self.g) < 0.2 else [caption, image]))
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--budget", type=int, default=4096)
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--text-only", type=float, default=0.0, help="fraction of text-only documents")
    ap.add_argument("--batches", type=int, default=200)
    args = ap.parse_args()
    config = ModelConfig(max_seq_len=args.budget, vocab_size=32005)
    stream = SyntheticSamples(config, args.latent, args.text_only, max_doc=args.budget - 2)
    packer = PackedBatches(stream, Collator(config), rows=args.rows, budget=args.budget)
    padding, samples = 0, 0
    for _ in range(args.batches):
        doc_ids = next(packer).inputs.doc_ids
        padding += int((doc_ids < 0).sum())
        samples += int((doc_ids.max(dim=1).values + 1).sum())
    fraction = padding / (args.batches * args.rows * args.budget)
    print(f"{args.rows} rows x {args.budget} tokens, text-only {args.text_only:.0%}: {fraction:.1%} padding, "
          f"{samples / args.batches:.1f} samples per micro-batch")
    print(json.dumps({"benchmark": "packing", "rows": args.rows, "budget": args.budget, "text_only": args.text_only,
                      "batches": args.batches, "padding_fraction": round(fraction, 4),
                      "samples_per_batch": round(samples / args.batches, 2)}))


if __name__ == "__main__":
    main()
