"""`tmot serve`: a Gradio page over a `Pipeline`: prompts -> images, an image -> its caption, and the
model's card.

The handlers (`ServeApp.generate`, `ServeApp.caption`) are plain methods that the page calls and tests can
call directly. Inputs are bounded (`Limits`), so one request cannot ask for more work than a CPU does in
reasonable time; requests run one at a time (Gradio's queue, concurrency 1), so concurrent users wait in
line instead of multiplying memory use. The server binds to 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from PIL import Image

from ..common.errors import InvalidInput, UserError
from .pipeline import Pipeline

SCHEDULERS = {"ddpm": ("ddpm", "ddim"), "flow": ("flow",)}
AUTOREGRESSIVE = "autoregressive"  # a model of image tokens: codes drawn one at a time


@dataclass
class Limits:
    """What one request may ask for."""

    max_prompts: int = 8
    max_images: int = 16  # prompts x images per prompt
    max_prompt_chars: int = 500
    max_steps: int = 250
    max_cfg: float = 20.0
    max_caption_tokens: int = 64
    queue_size: int = 16  # requests waiting at most; more are turned away with a message


class ServeApp:
    """The page's logic over a loaded pipeline (no Gradio here, so it is testable without a browser)."""

    def __init__(self, pipe: Pipeline, limits: Limits | None = None, source: str = "") -> None:
        self.pipe, self.limits, self.source = pipe, limits or Limits(), source
        tokens = pipe.model.config.image_tokens  # image codes are drawn one by one: no scheduler, no steps
        self.schedulers = (AUTOREGRESSIVE,) if tokens else SCHEDULERS[pipe.model.config.objective]

    def parse_prompts(self, text: str) -> list[str]:
        prompts = [line.strip() for line in (text or "").splitlines() if line.strip()]
        lim = self.limits
        if not prompts:
            raise InvalidInput("type a prompt (one per line)")
        if len(prompts) > lim.max_prompts:
            raise InvalidInput(f"{len(prompts)} prompts: at most {lim.max_prompts} per request")
        long = [p for p in prompts if len(p) > lim.max_prompt_chars]
        if long:
            raise InvalidInput(f"a prompt of {len(long[0])} characters: at most {lim.max_prompt_chars}")
        return prompts

    def generate(self, prompts_text: str, images_per_prompt: int = 1, seed: int = 0, cfg: float = 3.0,
                 steps: int = 50, scheduler: str | None = None,
                 guidance_rescale: float = 0.0) -> list[tuple[Image.Image, str]]:
        """[(image, "prompt · seed N")]: image k of the request uses seed + k (as `tmot sample`);
        guidance_rescale as `tmot sample --guidance-rescale` (diffusion models)."""
        lim = self.limits
        prompts = self.parse_prompts(prompts_text)
        n, steps, seed = int(images_per_prompt), int(steps), int(seed)
        if n < 1 or n * len(prompts) > lim.max_images:
            raise InvalidInput(f"{len(prompts)} prompts x {n} images: between 1 and {lim.max_images} images per request")
        if not 1 <= steps <= lim.max_steps:
            raise InvalidInput(f"steps must be between 1 and {lim.max_steps}, got {steps}")
        if not 0.0 <= float(cfg) <= lim.max_cfg:
            raise InvalidInput(f"guidance must be between 0 and {lim.max_cfg}, got {cfg}")
        scheduler = scheduler or self.schedulers[0]
        if scheduler not in self.schedulers:
            raise InvalidInput(f"scheduler {scheduler!r}: this model samples with {', '.join(self.schedulers)}")
        expanded = [p for p in prompts for _ in range(n)]
        seeds = [seed + k for k in range(len(expanded))]
        images = self.pipe.generate(expanded, seed=seeds, cfg_scale=float(cfg), num_steps=steps,
                                    scheduler=None if scheduler == AUTOREGRESSIVE else scheduler,
                                    guidance_rescale=float(guidance_rescale))
        return [(im, f"{p} · seed {s}") for im, p, s in zip(images, expanded, seeds)]

    def caption(self, image: Image.Image | None, max_new_tokens: int = 32) -> str:
        if image is None:
            raise InvalidInput("upload or drop an image first")
        tokens = int(max_new_tokens)
        if not 1 <= tokens <= self.limits.max_caption_tokens:
            raise InvalidInput(f"caption length must be between 1 and {self.limits.max_caption_tokens} tokens")
        return self.pipe.caption([image.convert("RGB")], max_new_tokens=tokens)[0]

    def card(self) -> str:
        """The model card without its metadata block (what the page shows)."""
        return self.pipe.model_card(metadata=False)

    # -- the page ----------------------------------------------------------------------------------

    def blocks(self) -> Any:
        import gradio as gr

        def guarded(fn):
            def run(*args):
                try:
                    return fn(*args)
                except InvalidInput as err:
                    raise gr.Error(str(err)) from None

            return run

        lim, pipe = self.limits, self.pipe
        with gr.Blocks(title="transfusion-mot", analytics_enabled=False) as page:
            gr.Markdown(f"## transfusion-mot · {self.source or 'model'}\n"
                        f"{pipe.image_size} px images, {sum(p.numel() for p in pipe.model.parameters()):,} "
                        f"parameters, on {pipe.device.type}. Requests run one at a time.")
            with gr.Tab("Text to image"):
                with gr.Row():
                    prompts = gr.Textbox(label=f"Prompts (one per line, at most {lim.max_prompts})", lines=3,
                                         placeholder="a large red circle", elem_id="prompts", scale=3)
                    with gr.Column(scale=1):
                        n = gr.Slider(1, lim.max_images, value=4, step=1, label="Images per prompt")
                        seed = gr.Number(value=0, precision=0, label="Seed (image k: seed + k)")
                with gr.Row():
                    cfg = gr.Slider(0.0, lim.max_cfg, value=3.0, step=0.5, label="Guidance (CFG)")
                    diffusion = self.schedulers != (AUTOREGRESSIVE,)
                    rescale = gr.Slider(0.0, 1.0, value=0.0, step=0.1, visible=diffusion,
                                        label="Guidance rescale (the demo samples with CFG 5 and 0.7)")
                    steps = gr.Slider(1, lim.max_steps, value=50, step=1, label="Steps", visible=diffusion)
                    scheduler = gr.Dropdown(list(self.schedulers), value=self.schedulers[0], label="Scheduler")
                go = gr.Button("Generate", variant="primary", elem_id="generate")
                gallery = gr.Gallery(label="Images", columns=8, height="auto", object_fit="contain", elem_id="gallery")
                inputs = [prompts, n, seed, cfg, steps, scheduler, rescale]
                go.click(guarded(self.generate), inputs, gallery)
                prompts.submit(guarded(self.generate), inputs, gallery)
            with gr.Tab("Image to text"):
                with gr.Row():
                    image = gr.Image(type="pil", label="Image", elem_id="caption-image")
                    with gr.Column():
                        tokens = gr.Slider(1, lim.max_caption_tokens, value=32, step=1, label="Max caption tokens")
                        describe = gr.Button("Caption", variant="primary", elem_id="caption")
                        text = gr.Textbox(label="Caption", elem_id="caption-text")
                describe.click(guarded(self.caption), [image, tokens], text)
            with gr.Tab("Model card"):
                gr.Markdown(self.card())
        return page.queue(default_concurrency_limit=1, max_size=lim.queue_size)


def serve(source: str, host: str = "127.0.0.1", port: int = 7860, device: str = "auto", step: int | None = None,
          ema: bool = True, limits: Limits | None = None) -> None:
    """Load a run directory, exported directory or hub id and serve its page until interrupted."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home
    try:
        import gradio as gr
    except ImportError:
        raise UserError("tmot serve needs Gradio: pip install 'transfusion-mot[app]'") from None

    from .pipeline import load_pipeline

    pipe = load_pipeline(source, step=step, ema=ema, device=device)
    app = ServeApp(pipe, limits, source=str(source))
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # no web fonts fetched from elsewhere
    print(f"tmot serve: {source} on http://{host}:{port} (Ctrl-C stops)", flush=True)
    app.blocks().launch(server_name=host, server_port=port, share=False, show_error=True, quiet=True, theme=theme,
                        footer_links=["api"])


__all__ = ["Limits", "ServeApp", "serve"]
