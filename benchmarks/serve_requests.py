"""How long a `tmot serve` request takes: `ServeApp.generate` (what the page calls) on a run or exported
directory, for a typical request and for the largest the limits allow; median of the repeats after a
warm-up. The last line is one JSON object.

    python benchmarks/serve_requests.py --run tmot_demo/run [--repeats 3 --device cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from transfusion_mot.inference.app import Limits, ServeApp
from transfusion_mot.inference.pipeline import load_pipeline

PROMPTS = "a large red circle\na small blue square in the top left"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="run directory, exported directory or hub id")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    app = ServeApp(load_pipeline(args.run, device=args.device))
    app.generate("a large red circle", images_per_prompt=1, steps=2)  # warm-up
    lim, results = Limits(), {}
    for name, kwargs in (("2 prompts x 4 images, 50 steps", {"images_per_prompt": 4, "steps": 50}),
                         (f"2 prompts x {lim.max_images // 2} images, {lim.max_steps} steps (the limits)",
                          {"images_per_prompt": lim.max_images // 2, "steps": lim.max_steps})):
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            app.generate(PROMPTS, cfg=3.0, **kwargs)
            times.append(time.perf_counter() - start)
        results[name] = round(statistics.median(times), 3)
        print(f"{name}: {results[name]} s", flush=True)
    print(json.dumps({"benchmark": "serve_requests", "run": args.run, "device": args.device,
                      "threads": torch.get_num_threads(), "seconds": results}))


if __name__ == "__main__":
    main()
