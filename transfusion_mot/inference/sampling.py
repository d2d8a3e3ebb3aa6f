"""Text -> image (diffusion over the image patches, or image codes one by one) and image -> text
(captioning), with a KV cache.

Both directions use the training layout, built by `batch.Collator`:

    generation:  BOS caption BOI p_1 .. p_N EOI ...      (the caption is a causal prefix)
    captioning:  BOS BOI p_1 .. p_N EOI caption EOS      (the clean image, timestep 0, is the prefix)

With image tokens (Chameleon, `generate_codes`) the N codes are decoded autoregressively after the prefix,
each one run alone against the cache, with guidance on the logits, temperature and top-k/top-p.

Neither prefix can see what follows it, so its keys/values are computed once (`model.KVCache`): each
denoising step then runs only the N image tokens against the cached prefix, and each decoded token runs
alone. `use_kv_cache=False` is the slow exact path that re-runs the whole sequence (built by the Collator)
at every step; the tests check that both paths agree.

Classifier-free guidance: the unconditional prompt is the empty caption (`BOS BOI`), as in training's 10%
caption drop. Conditional and unconditional rows go through the model in one forward per step and
`eps = eps_u + s * (eps_c - eps_u)`; s = 1 skips the unconditional rows. `guidance_rescale` phi > 0 then pulls
the clean latent the guided prediction implies back towards the conditional one's spread (Lin et al., arXiv
2305.08891, section 3.4): a large s otherwise pushes colours off the ones trained (the demo's oranges turn
lighter, some read as yellow). Only with guidance (s != 1).
Prefixes of different lengths share a batch by right-padding (doc_id -1: the mask hides pad keys); positions
restart at 0 per document as in training, so padding changes nothing but float rounding.

Randomness: each image has its own CPU `torch.Generator` (seeded per prompt) for its initial noise and for
the scheduler's noise, so a seed gives the same image whatever else is in the batch and on any device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import replace
from functools import partial

import torch
from torch import Tensor

from ..batch import Collator, Sample, SpecialTokens, patchify, unpatchify
from ..common.errors import InvalidInput
from ..config import ModelConfig
from ..diffusion import DiffusionObjective, make_objective
from ..model import KVCache, TransfusionMoT
from ..tokenizer import AnyTokenizer

SCHEDULERS = ("ddpm", "ddim", "flow")
Predictor = Callable[[Tensor, Tensor], Tensor]  # (rows, N, patch_dim) noisy patches, (rows,) t -> prediction


# --------------------------------------------------------------------------------------------------
# small helpers


def scheduler_name(config: ModelConfig, scheduler: str | None) -> str:
    """The sampler `scheduler` names, or a model's own: its objective's (ddpm for DDPM models, flow for flow
    models)."""
    return scheduler or config.objective


def _seeds(seed: int | Sequence[int], n: int) -> list[int]:
    """One seed per item: `seed + i` for an int, or the given list (one per item)."""
    if isinstance(seed, int):
        return [seed + i for i in range(n)]
    seeds = [int(s) for s in seed]
    if len(seeds) != n:
        raise ValueError(f"got {len(seeds)} seeds for {n} items; pass one int or one seed per item")
    return seeds


def _autocast(device: torch.device, dtype: torch.dtype | None):
    """Run the backbone in `dtype` (e.g. bf16) under autocast; None or float32: as the weights are."""
    if dtype is None or dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _specials(tokenizer: AnyTokenizer, model: TransfusionMoT) -> SpecialTokens:
    if tokenizer.vocab_size != model.config.vocab_size:
        raise InvalidInput(f"tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                         f"{model.config.vocab_size}")
    return tokenizer.specials


# --------------------------------------------------------------------------------------------------
# text -> image


def _cached_predictor(model: TransfusionMoT, captions: list[list[int]], latent_shape: tuple[int, int, int],
                      specials: SpecialTokens, device: torch.device) -> Predictor:
    """The prefix `BOS caption BOI` of every row computed once into a KV cache; each call runs only the N image
    positions that follow it (both laid out by the Collator)."""
    cfg = model.config
    prefix, image = Collator(cfg, specials).collate_generation(captions, latent_shape)
    prefix, image = prefix.to(device), image.to(device)
    rows, n = image.tokens.shape
    cache = KVCache.empty(cfg.n_layers, rows, device)
    model(prefix.inputs, check=False, cache=cache)
    cache.reserve(n)  # each step's image keys/values go after the prefix's, in place

    def predict(patches: Tensor, t: Tensor) -> Tensor:
        inputs = replace(image, patches=patches.reshape(rows * n, -1), timesteps=t)
        hidden = model(inputs, check=False, cache=cache, extend_cache=False)
        return model.image_head(hidden.reshape(rows * n, -1)).reshape(rows, n, -1)

    return predict


def _full_predictor(model: TransfusionMoT, captions: list[list[int]], latent_shape: tuple[int, int, int],
                    specials: SpecialTokens, device: torch.device) -> Predictor:
    """The slow exact path: the whole training-layout sequence (Collator) at every step."""
    placeholder = torch.zeros(latent_shape)
    batch = Collator(model.config, specials).collate_padded([Sample([c, placeholder]) for c in captions]).to(device)
    is_image = batch.inputs.modality == model.image_modality
    rows = len(captions)

    def predict(patches: Tensor, t: Tensor) -> Tensor:
        hidden = model(batch.noised(patches.reshape(-1, patches.shape[-1]), t), check=False)
        return model.image_head(hidden[is_image]).reshape(rows, -1, patches.shape[-1])

    return predict


def rescale_guidance(objective: DiffusionObjective, guided: Tensor, cond: Tensor, noisy: Tensor, timestep: float,
                     phi: float) -> Tensor:
    """Guidance rescale (Lin et al., arXiv 2305.08891, section 3.4) on the clean latent: the x_0 the guided
    prediction implies, scaled per image so that its standard deviation is the conditional x_0's, mixed with
    the unscaled one by `phi` (0: plain guidance, 1: fully rescaled) and turned back into a prediction.
    Rescaling x_0 rather than the raw prediction (diffusers' `rescale_noise_cfg`) drew shapes and positions
    better here, colours as well (BENCHMARKS.md, "Guidance rescale"). guided, cond, noisy: (n, ...) per
    image."""
    clean = objective.clean_estimate(guided, noisy, timestep)
    dims = tuple(range(1, guided.dim()))
    wanted = objective.clean_estimate(cond, noisy, timestep).std(dim=dims, keepdim=True)
    ratio = wanted / clean.std(dim=dims, keepdim=True)
    return objective.prediction_from_clean(clean * (phi * ratio + (1.0 - phi)), noisy, timestep)


def _denoise(predict: Predictor, scheduler, noise: Tensor, generators: list[torch.Generator], cfg_scale: float,
             patch: int, objective: DiffusionObjective, guidance_rescale: float = 0.0) -> Tensor:
    """Run the scheduler from `noise` (n, C, H, W), fp32, guiding with the second half of the rows when
    cfg_scale != 1 (rescaled by `guidance_rescale` with the `objective`'s x_0 when it is > 0). Model
    timesteps are on the [0, T] scale: DDPM/DDIM's integer steps, and for FlowMatchEuler its `timesteps`,
    which are already sigma * num_train_timesteps."""
    _, c, h, w = noise.shape
    guided = cfg_scale != 1.0
    # DDPM/DDIM/FlowMatchEuler start from unit noise and feed x_t to the model as is; the getattr calls
    # keep schedulers that do scale (e.g. Euler on the DDPM schedule) correct
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    scale_input = getattr(scheduler, "scale_model_input", lambda sample, _t: sample)
    for t in scheduler.timesteps:
        model_in = scale_input(x, t)
        patches = torch.stack([patchify(img, patch) for img in model_in])
        noisy = patches
        if guided:
            patches = torch.cat([patches, patches])
        t_model = t.float().expand(patches.shape[0]).to(x.device)
        pred = predict(patches, t_model).float()
        if guided:
            cond, uncond = pred.chunk(2)
            pred = uncond + cfg_scale * (cond - uncond)
            if guidance_rescale > 0.0:
                pred = rescale_guidance(objective, pred, cond, noisy.float(), float(t), guidance_rescale)
        out = torch.stack([unpatchify(p, c, h, w, patch) for p in pred])
        x = scheduler.step(out, t, x, generator=generators).prev_sample
    return x


def _encode_prompts(model: TransfusionMoT, tokenizer: AnyTokenizer, prompts: Sequence[str],
                    image_shape: tuple[int, ...], specials: SpecialTokens) -> list[list[int]]:
    """Each prompt's token ids, once checked to fit the model's context with the image and special tokens."""
    collator = Collator(model.config, specials)
    captions = [tokenizer.encode(text) for text in prompts]
    # positions of the training layout for an empty caption (BOS BOI image EOI EOS); each token adds one
    image_and_specials = collator.layout_length(Sample([[], collator.placeholder(image_shape)]))
    for i, ids in enumerate(captions):
        total = len(ids) + image_and_specials
        if total > model.config.max_seq_len:
            raise InvalidInput(f"prompt {i} has {len(ids)} tokens; with the image and the special tokens that is "
                               f"{total} positions, more than the model's max_seq_len {model.config.max_seq_len}")
    return captions


def _check_request(prompts: Sequence[str], batch_size: int, cfg_scale: float) -> None:
    """What every text -> image request needs, whichever sampler runs it."""
    if not prompts:
        raise InvalidInput("no prompts to generate from")
    if batch_size < 1:
        raise InvalidInput(f"batch_size must be positive, got {batch_size}")
    if not 0.0 <= float(cfg_scale) <= 100.0:  # nan and inf too: they would only make noise
        raise InvalidInput(f"cfg_scale must be a number in [0, 100], got {cfg_scale}")


def generate_latents(model: TransfusionMoT, tokenizer: AnyTokenizer, prompts: Sequence[str], *,
                     latent_shape: tuple[int, int, int], scheduler: str | None = None, num_steps: int = 50,
                     cfg_scale: float = 3.0, guidance_rescale: float = 0.0, seed: int | Sequence[int] = 0,
                     use_kv_cache: bool = True, batch_size: int = 8, device: torch.device | str | None = None,
                     dtype: torch.dtype | None = None) -> Tensor:
    """Latents (N, C, H, W) for N prompts (decode them with the VAE).

    scheduler: "ddpm" or "ddim" for a ddpm-objective model, "flow" for a flow model (None: the objective's
    own). guidance_rescale: in [0, 1], how far guidance's x_0 is rescaled to the conditional one's spread
    (0: plain guidance; nothing to rescale when cfg_scale is 1). batch_size: prompts per forward (twice as
    many rows with guidance). seed: an int (prompt i uses seed + i) or one seed per prompt; the image of a
    prompt depends only on its seed, not on the batch it lands in. dtype: the backbone's compute dtype under
    autocast (None: the weights' dtype); the scheduler arithmetic stays in float32. ValueError for no
    prompts, or a prompt too long for the model's context.
    """
    cfg = model.config
    if cfg.image_tokens:
        raise InvalidInput("this model draws image codes (image_objective tokens): use generate_codes")
    _check_request(prompts, batch_size, cfg_scale)
    if not 0.0 <= float(guidance_rescale) <= 1.0:
        raise InvalidInput(f"guidance_rescale must be a number in [0, 1], got {guidance_rescale}")
    if num_steps < 1:
        raise InvalidInput(f"num_steps must be positive, got {num_steps}")
    c, h, w = latent_shape
    p = cfg.patch_size
    if c != cfg.latent_channels or h % p or w % p:
        raise ValueError(f"latent_shape {tuple(latent_shape)} must be ({cfg.latent_channels}, H, W) with H and W "
                         f"divisible by patch_size {p}")
    specials = _specials(tokenizer, model)
    captions = _encode_prompts(model, tokenizer, prompts, latent_shape, specials)
    seeds = _seeds(seed, len(prompts))
    device = torch.device(device) if device is not None else next(model.parameters()).device
    objective = make_objective(cfg)
    if scheduler is not None and scheduler not in SCHEDULERS:
        raise InvalidInput(f"unknown scheduler {scheduler!r}; choose one of {list(SCHEDULERS)}")
    objective.make_scheduler(scheduler)  # a scheduler that does not fit the objective fails before any work
    guided = cfg_scale != 1.0
    out = []
    with torch.no_grad(), _autocast(device, dtype):
        for start in range(0, len(prompts), batch_size):
            caps = captions[start:start + batch_size]
            rows = caps + [[] for _ in caps] if guided else caps  # unconditional rows: the empty caption
            if use_kv_cache:
                predict = _cached_predictor(model, rows, (c, h, w), specials, device)
            else:
                predict = _full_predictor(model, rows, (c, h, w), specials, device)
            generators = [torch.Generator().manual_seed(s) for s in seeds[start:start + batch_size]]
            noise = torch.stack([torch.randn((c, h, w), generator=g) for g in generators]).to(device)
            sched = objective.make_scheduler(scheduler)
            sched.set_timesteps(num_steps)  # timesteps stay on the CPU, where the schedule tables are
            out.append(_denoise(predict, sched, noise, generators, cfg_scale, p, objective, guidance_rescale))
    return torch.cat(out)


def _check_picking(temperature: float, top_k: int | None, top_p: float | None = None) -> None:
    if top_k is not None and top_k < 1:
        raise InvalidInput(f"top_k must be positive, got {top_k}")
    if top_p is not None and not 0.0 < float(top_p) <= 1.0:
        raise InvalidInput(f"top_p must be in (0, 1], got {top_p}")
    if not 0.0 <= float(temperature) <= 10.0:
        raise InvalidInput(f"temperature must be a number in [0, 10], got {temperature}")


def _decode_codes(model: TransfusionMoT, captions: list[list[int]], grid: tuple[int, int], specials: SpecialTokens,
                  device: torch.device, cfg_scale: float, pick: Callable[[Tensor], Tensor], use_kv_cache: bool) -> Tensor:
    """The N = h*w codes after each caption's `BOS caption BOI`, one at a time: with guidance the second half
    of `captions` are the unconditional rows and logits mix as l_u + s (l_c - l_u) before `pick` (logits ->
    codes). With the cache each code runs alone against the keys/values before it; without it the whole
    sequence (codes so far, zeros after: the causal mask hides them) runs at every step."""
    collator = Collator(model.config, specials)
    prefix, image = collator.collate_generation(captions, grid)
    prefix, image = prefix.to(device), image.to(device)
    rows, n = image.tokens.shape
    last = (prefix.inputs.doc_ids >= 0).sum(dim=1) - 1  # each row's BOI: it predicts the first code
    guided = cfg_scale != 1.0
    codes = torch.zeros(rows, n, dtype=torch.long, device=device)
    cache = KVCache.empty(model.config.n_layers, rows, device) if use_kv_cache else None
    if cache is not None:
        hidden = model(prefix.inputs, check=False, cache=cache)[torch.arange(rows, device=device), last]
    for i in range(n):
        if cache is None:  # the slow exact path: the training layout of (caption, codes so far)
            grids = [c.reshape(grid).cpu() for c in codes]
            full = collator.collate_padded([Sample([cap, g]) for cap, g in zip(captions, grids)]).to(device)
            hidden = model(full.inputs, check=False)[torch.arange(rows, device=device), last + i]
        logits = model.image_logits(hidden).float()  # (rows, K)
        if guided:
            cond, uncond = logits.chunk(2)
            logits = uncond + cfg_scale * (cond - uncond)
        picked = pick(logits)
        codes[:, i] = torch.cat([picked, picked]) if guided else picked  # both rows of an image read its code
        if cache is not None and i + 1 < n:
            step = replace(image.window(i, i + 1, model.image_modality), tokens=codes[:, i:i + 1])
            hidden = model(step, check=False, cache=cache)[:, 0]
    return codes[:rows // 2 if guided else rows].reshape(-1, *grid)


def generate_codes(model: TransfusionMoT, tokenizer: AnyTokenizer, prompts: Sequence[str], *,
                   grid: tuple[int, int], cfg_scale: float = 3.0, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None, seed: int | Sequence[int] = 0, use_kv_cache: bool = True,
                   batch_size: int = 8, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> Tensor:
    """Image codes (N, h, w) for N prompts, drawn autoregressively in raster order by a tokens-objective model
    (decode them with its VQ tokenizer).

    Classifier-free guidance mixes conditional and unconditional (empty caption) logits, computed in one
    forward per code, before temperature, top_k and top_p (nucleus) pick the code; temperature 0 is greedy.
    seed: an int (prompt i uses seed + i) or one seed per prompt: each image draws from its own generator, so
    its codes do not depend on the batch it lands in. `use_kv_cache=False` re-runs the whole sequence per
    code (slow, exact: the tests check both agree).
    """
    cfg = model.config
    if not cfg.image_tokens:
        raise InvalidInput("this model denoises latents (image_objective diffusion): use generate_latents")
    _check_request(prompts, batch_size, cfg_scale)
    _check_picking(temperature, top_k, top_p)
    if len(grid) != 2 or min(grid) < 1:
        raise InvalidInput(f"grid must be the code grid's (h, w), got {tuple(grid)}")
    specials = _specials(tokenizer, model)
    captions = _encode_prompts(model, tokenizer, prompts, tuple(grid), specials)
    seeds = _seeds(seed, len(prompts))
    device = torch.device(device) if device is not None else next(model.parameters()).device
    guided = cfg_scale != 1.0
    out = []
    with torch.no_grad(), _autocast(device, dtype):
        for start in range(0, len(prompts), batch_size):
            caps = captions[start:start + batch_size]
            generators = [torch.Generator().manual_seed(s) for s in seeds[start:start + batch_size]]
            pick = partial(_pick_tokens, temperature=temperature, top_k=top_k, generators=generators, top_p=top_p)
            rows = caps + [[] for _ in caps] if guided else caps  # unconditional rows: the empty caption
            out.append(_decode_codes(model, rows, tuple(grid), specials, device, cfg_scale, pick, use_kv_cache))
    return torch.cat(out).cpu()


# --------------------------------------------------------------------------------------------------
# image -> text


def _pick_tokens(logits: Tensor, temperature: float, top_k: int | None,
                 generators: list[torch.Generator], top_p: float | None = None) -> Tensor:
    """Greedy when temperature is 0, else sampling from the softmax, row r with generators[r]: of the top_k
    most likely tokens (when given), then of the smallest set whose probability reaches top_p (nucleus)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p  # the mass before it already reaches top_p (never the first)
        logits = logits.masked_fill(torch.zeros_like(outside).scatter(-1, order, outside), float("-inf"))
    probs = logits.softmax(dim=-1).cpu()
    picks = [torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(generators)]
    return torch.cat(picks).to(logits.device)


def caption_images(model: TransfusionMoT, tokenizer: AnyTokenizer, latents: Tensor, *, max_new_tokens: int = 64,
                   temperature: float = 0.0, top_k: int | None = None, seed: int | Sequence[int] = 0,
                   use_kv_cache: bool = True, device: torch.device | str | None = None) -> list[str]:
    """One caption per latent (N, C, H, W), or per code grid (N, h, w) for a tokens-objective model:
    `BOS BOI image EOI` with the clean image (timestep 0), then text decoded until EOS, `max_new_tokens`, or
    the model's context, whichever comes first.

    temperature 0 is greedy; otherwise sample (from the top_k most likely tokens when given), image i
    with its own generator seeded by `seed + i` (or seed[i]).
    """
    cfg = model.config
    want = "(N, h, w) code grids" if cfg.image_tokens else "(N, C, H, W) latents"
    if latents.dim() != (3 if cfg.image_tokens else 4) or latents.shape[0] == 0:
        raise ValueError(f"images must be non-empty {want}, got shape {tuple(latents.shape)}")
    _check_picking(temperature, top_k)
    specials = _specials(tokenizer, model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    n = latents.shape[0]
    if not cfg.image_tokens:
        _, c, h, w = latents.shape
        p = cfg.patch_size
        if c != cfg.latent_channels or h % p or w % p:
            raise ValueError(f"latents {tuple(latents.shape)} must be (N, {cfg.latent_channels}, H, W) with H and W "
                             f"divisible by patch_size {p}")
    # the prompt (BOS BOI image EOI) and room for the caption, laid out by the Collator
    collator = Collator(cfg, specials)
    images = [img.cpu() if cfg.image_tokens else img.float().cpu() for img in latents]
    prompt_len = collator.layout_length(Sample(images[:1], image_first=True)) - 1  # all but the trailing EOS
    if prompt_len >= cfg.max_seq_len:
        raise InvalidInput(f"the image takes {prompt_len} of the model's {cfg.max_seq_len} positions: no room for text")
    budget = min(max_new_tokens, cfg.max_seq_len - prompt_len)
    sequence = collator.collate_captioning(images, room=budget).to(device)
    tokens = sequence.tokens  # decoded tokens are written here

    generators = [torch.Generator().manual_seed(s) for s in _seeds(seed, n)]
    done = torch.zeros(n, dtype=torch.bool, device=device)
    image = model.image_modality
    length = prompt_len  # positions filled so far
    with torch.no_grad():
        cache = KVCache.empty(cfg.n_layers, n, device) if use_kv_cache else None
        for _ in range(budget):
            if cache is None:  # the whole sequence every step
                hidden = model(sequence.window(0, length, image), check=False)
            elif length == prompt_len:  # the image prompt, once
                hidden = model(sequence.window(0, length, image), check=False, cache=cache)
            else:  # only the newest token
                hidden = model(sequence.window(length - 1, length, image), check=False, cache=cache)
            token = _pick_tokens(model.text_logits(hidden[:, -1]), temperature, top_k, generators)
            token = torch.where(done, torch.full_like(token, specials.eos), token)
            tokens[:, length] = token
            length += 1
            done |= token == specials.eos
            if bool(done.all()):
                break
    generated = tokens[:, prompt_len:length]
    captions = []
    for row in generated.tolist():
        if specials.eos in row:
            row = row[:row.index(specials.eos)]
        captions.append(tokenizer.decode(row))
    return captions
