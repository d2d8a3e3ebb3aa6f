"""The Chameleon setting (`image_objective: tokens`): layout, mask, loss and autoregressive code sampling,
each against a reference written here (the Collator's layout read position by position, a naive
one-prompt sampler, plain cross-entropy)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_config

from transfusion_mot.batch import IGNORE_INDEX, Collator, Sample
from transfusion_mot.common.errors import ConfigError, InvalidInput
from transfusion_mot.config import check_image_data
from transfusion_mot.inference.sampling import _pick_tokens, generate_codes, generate_latents
from transfusion_mot.losses import TransfusionStep, chameleon_loss
from transfusion_mot.model import TransfusionMoT
from transfusion_mot.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
K = 24  # codebook size
GRID = (3, 4)
PROMPTS = ["a red circle", "blue", "a small green square above a circle"]  # different lengths


def tokens_config(**overrides):
    return tiny_config(image_objective="tokens", codebook_size=K, vocab_size=TOK.vocab_size, **overrides)


def code_samples(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        text = torch.randint(0, TOK.vocab_size - 5, (3 + i,), generator=g).tolist()
        codes = torch.randint(0, K, GRID, generator=g)
        out.append(Sample([text, codes]) if i % 2 == 0 else Sample([codes, text], image_first=True))
    return out


def make_model(**overrides) -> TransfusionMoT:
    """Random weights large enough that codes depend clearly on the prompt and on earlier codes."""
    torch.manual_seed(0)
    model = TransfusionMoT(tokens_config(dim=32, n_heads=2, ffn_dim=64, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(std=0.3)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return make_model()


def test_config_defaults_follow_the_objective_and_bad_combinations_are_refused():
    cfg = tokens_config()
    assert (cfg.image_attention, cfg.image_loss_weight) == ("causal", 1.0)
    assert (tiny_config().image_attention, tiny_config().image_loss_weight) == ("bidirectional", 5.0)
    with pytest.raises(ConfigError, match="codebook_size"):
        tiny_config(image_objective="tokens")
    with pytest.raises(ConfigError, match="image_attention: causal"):
        tokens_config(image_attention="bidirectional")
    with pytest.raises(ConfigError, match="adaln"):
        tokens_config(time_conditioning="adaln")


def test_layout_puts_codes_in_tokens_with_next_code_targets():
    cfg = tokens_config()
    collator = Collator(cfg, TOK.specials)
    codes = torch.randint(0, K, GRID, generator=torch.Generator().manual_seed(1))
    batch = collator.collate_padded([Sample([[7, 8], codes, [9]])])
    tokens, targets, image_targets = batch.inputs.tokens[0], batch.text_targets[0], batch.image_targets[0]
    sp = TOK.specials
    n = GRID[0] * GRID[1]
    expected = [sp.bos, 7, 8, sp.boi, *codes.reshape(-1).tolist(), sp.eoi, 9, sp.eos]
    assert tokens.tolist() == expected
    is_image = batch.inputs.modality[0] == cfg.modalities.index("image")
    assert is_image.nonzero().squeeze(1).tolist() == list(range(4, 4 + n))
    # reference, position by position: a code is predicted from the position before it; text from text
    for i in range(len(expected) - 1):
        nxt_image = bool(is_image[i + 1])
        assert image_targets[i] == (expected[i + 1] if nxt_image else IGNORE_INDEX)
        assert targets[i] == (expected[i + 1] if not nxt_image and not is_image[i] else IGNORE_INDEX)
    assert batch.inputs.patches.shape == (0, cfg.patch_dim)
    assert batch.inputs.patch_coords.tolist() == [[r, c] for r in range(GRID[0]) for c in range(GRID[1])]


def test_continuous_latents_for_a_tokens_model_and_codes_for_a_diffusion_model_are_one_line_errors():
    with pytest.raises(InvalidInput, match="tokens.*continuous latent"):
        Collator(tokens_config(), TOK.specials).collate_padded([Sample([[1], torch.randn(4, 4, 4)])])
    with pytest.raises(InvalidInput, match="diffusion.*code grid"):
        Collator(tiny_config(vocab_size=TOK.vocab_size), TOK.specials).collate_padded(
            [Sample([[1], torch.zeros(4, 4, dtype=torch.long)])])
    with pytest.raises(InvalidInput, match="outside the codebook"):
        Collator(tokens_config(), TOK.specials).collate_padded([Sample([[1], torch.full(GRID, K)])])
    with pytest.raises(ConfigError, match=r"image_objective is tokens .* holds continuous latents \(4, 8, 8\)"):
        check_image_data(tokens_config(), (4, 8, 8), None, "data.path x")
    with pytest.raises(ConfigError, match=r"image_objective is diffusion .* holds VQ code grids \(8, 8\)"):
        check_image_data(tiny_config(), (8, 8), 256, "data.path x")
    with pytest.raises(ConfigError, match="codebook_size is 24"):
        check_image_data(tokens_config(), (8, 8), 256, "data.path x")


def test_attention_is_causal_everywhere_including_inside_an_image(model):
    """Changing the code at position j changes no hidden state before j: no position sees a later one."""
    batch = Collator(model.config, TOK.specials).collate_padded(code_samples(2))
    with torch.no_grad():
        base = model(batch.inputs)
    is_image = (batch.inputs.modality[0] == model.image_modality).nonzero().squeeze(1).tolist()
    for j in (is_image[0], is_image[5], is_image[-1]):
        tokens = batch.inputs.tokens.clone()
        tokens[0, j] = (tokens[0, j] + 1) % K
        with torch.no_grad():
            changed = model(type(batch.inputs)(**{**vars(batch.inputs), "tokens": tokens}))
        assert torch.equal(changed[0, :j], base[0, :j])
        assert not torch.allclose(changed[0, j], base[0, j])
        assert torch.equal(changed[1], base[1])


def test_loss_equals_plain_cross_entropy_over_the_next_code_and_next_text_token(model):
    batch = Collator(model.config, TOK.specials).collate_padded(code_samples(4))
    with torch.no_grad():
        out = chameleon_loss(model, batch, details=True)
        hidden = model(batch.inputs).reshape(-1, model.config.dim)
    text_t, image_t = batch.text_targets.reshape(-1), batch.image_targets.reshape(-1)
    text_rows, image_rows = text_t != IGNORE_INDEX, image_t != IGNORE_INDEX
    text = F.cross_entropy(model.text_logits(hidden[text_rows]), text_t[text_rows])
    image_nll = F.cross_entropy(model.image_logits(hidden[image_rows]), image_t[image_rows], reduction="none")
    torch.testing.assert_close(out["text_loss"], text, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["image_loss"], image_nll.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"], text + model.config.image_loss_weight * image_nll.mean())
    n = GRID[0] * GRID[1]  # every image has n targets (its BOI and all codes but the last), in image order
    torch.testing.assert_close(out["image_nll_per_image"], image_nll.view(-1, n).mean(dim=1), rtol=1e-5, atol=1e-6)
    # the module the trainer calls takes the same path (and ignores diffusion draws)
    step = TransfusionStep(model, objective=None)
    torch.testing.assert_close(step(batch, generator=torch.Generator())["loss"], out["loss"])


def test_mot_with_copied_experts_equals_dense_at_step_zero():
    batch = Collator(tokens_config(), TOK.specials).collate_padded(code_samples(4))
    torch.manual_seed(3)
    dense = TransfusionMoT(tokens_config(untie=[]))
    torch.manual_seed(3)
    mot = TransfusionMoT(tokens_config(expert_init="copy"))
    assert sum(p.numel() for p in mot.parameters()) > sum(p.numel() for p in dense.parameters())
    a, b = chameleon_loss(dense, batch), chameleon_loss(mot, batch)
    for key in ("loss", "text_loss", "image_loss"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-6)
    torch.manual_seed(3)
    random_experts = chameleon_loss(TransfusionMoT(tokens_config(expert_init="random")), batch)
    assert not torch.allclose(random_experts["loss"], a["loss"])


def test_loss_trains_both_terms():
    torch.manual_seed(0)
    model = TransfusionMoT(tokens_config())
    batch = Collator(model.config, TOK.specials).collate_padded(code_samples(4))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = chameleon_loss(model, batch)
    for _ in range(30):
        out = chameleon_loss(model, batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert out["image_loss"] < 0.6 * first["image_loss"] and out["text_loss"] < 0.6 * first["text_loss"]


def reference_codes(model, prompt, seed, cfg_scale, temperature, top_k, top_p):
    """One prompt, the whole training layout re-run per code, conditional and unconditional separately."""
    collator = Collator(model.config, TOK.specials)
    g = torch.Generator().manual_seed(seed)
    codes = torch.zeros(GRID, dtype=torch.long)
    boi = len(collator._layout(Sample([TOK.encode(prompt), codes]))["tokens"]) - GRID[0] * GRID[1] - 3
    uncond_boi = 1  # BOS BOI
    for i in range(GRID[0] * GRID[1]):
        def logits_at(caption, at):
            batch = collator.collate_padded([Sample([caption, codes])])
            with torch.no_grad():
                return model.image_logits(model(batch.inputs)[0, at + i])[None]
        logits = logits_at(TOK.encode(prompt), boi)
        if cfg_scale != 1.0:
            uncond = logits_at([], uncond_boi)
            logits = uncond + cfg_scale * (logits - uncond)
        codes.view(-1)[i] = _pick_tokens(logits, temperature, top_k, [g], top_p)[0]
    return codes


@pytest.mark.parametrize("cfg_scale,temperature,top_k,top_p", [(1.0, 0.0, None, None), (1.0, 1.0, None, None),
                                                               (3.0, 1.0, 8, None), (2.0, 0.7, None, 0.8)])
def test_cached_batched_sampling_equals_the_reference_and_the_uncached_path(model, cfg_scale, temperature, top_k,
                                                                            top_p):
    kw = dict(grid=GRID, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p, seed=5)
    cached = generate_codes(model, TOK, PROMPTS, batch_size=2, **kw)
    uncached = generate_codes(model, TOK, PROMPTS, use_kv_cache=False, batch_size=3, **kw)
    assert cached.shape == (len(PROMPTS), *GRID) and cached.dtype == torch.long
    assert torch.equal(cached, uncached)
    for i, prompt in enumerate(PROMPTS):
        assert torch.equal(cached[i], reference_codes(model, prompt, 5 + i, cfg_scale, temperature, top_k, top_p))
    if temperature > 0:  # the draws are not all the same code: the test exercises sampling
        assert len(cached.unique()) > 3


def test_compiled_blocks_draw_the_eager_codes_and_compile_once():
    """`tmot sample --compile` on a model of image tokens (blocks traced through AOTAutograd here, without
    inductor's C++ build): the eager codes, one at a time over a growing cache, and three graphs (prefix,
    first code, later codes) that batches of other prompt lengths reuse."""
    import torch._dynamo

    from transfusion_mot.common.compile import compile_blocks, compile_counts

    eager, compiled = make_model(), make_model()
    compiled.load_state_dict(eager.state_dict())
    torch._dynamo.reset()
    before = compile_counts()
    compile_blocks(compiled, backend="aot_eager")
    kw = {"grid": GRID, "cfg_scale": 3.0, "temperature": 0.0, "batch_size": 2, "seed": 1}
    graphs = []
    for prompts in (PROMPTS[:2], [PROMPTS[2], "green"], ["a blue square", PROMPTS[1]]):
        assert torch.equal(generate_codes(compiled, TOK, prompts, **kw), generate_codes(eager, TOK, prompts, **kw))
        graphs.append(compile_counts()["graphs"] - before["graphs"])
    assert graphs == [3, 3, 3] and compile_counts()["graph_breaks"] == before["graph_breaks"]


def test_guidance_scale_one_is_conditional_sampling_and_other_scales_differ(model):
    kw = dict(grid=GRID, temperature=1.0, seed=0)
    one = generate_codes(model, TOK, PROMPTS, cfg_scale=1.0, **kw)
    reference = torch.stack([reference_codes(model, p, i, 1.0, 1.0, None, None) for i, p in enumerate(PROMPTS)])
    assert torch.equal(one, reference)
    assert not torch.equal(generate_codes(model, TOK, PROMPTS, cfg_scale=4.0, **kw), one)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = {int(_pick_tokens(logits, 1.0, None, [torch.Generator().manual_seed(s)], top_p=0.75)[0]) for s in range(200)}
    assert draws == {0, 1}
    draws = {int(_pick_tokens(logits, 1.0, None, [torch.Generator().manual_seed(s)], top_p=0.3)[0]) for s in range(50)}
    assert draws == {0}


def test_sampling_refuses_the_other_objective_and_bad_settings(model):
    with pytest.raises(InvalidInput, match="generate_codes"):
        generate_latents(model, TOK, ["a"], latent_shape=(4, 4, 4))
    with pytest.raises(InvalidInput, match="top_p"):
        generate_codes(model, TOK, ["a"], grid=GRID, top_p=0.0)
    with pytest.raises(InvalidInput, match="max_seq_len"):
        generate_codes(model, TOK, ["a" * 200], grid=GRID)
