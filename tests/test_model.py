"""The MoT backbone against a naive per-token reference, parameter counts, expert isolation, bad input."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import random_samples, tiny_config

from transfusion_mot.batch import Collator, Sample
from transfusion_mot.model import Experts, Routing, TransfusionMoT

ALL = ["attn", "ffn", "norm"]


# -------------------------------------------------------------------------------------------------
# a straightforward reference: every token looks up the weights of its own modality, one at a time


def pick(experts, m):
    return experts[m] if len(experts) > 1 else experts[0]


def rms(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def per_token(fn, x, modality):
    """fn(m, row) applied row by row: the naive routing."""
    return torch.stack([fn(int(m), row) for m, row in zip(modality, x)])


def naive_mask(doc, img, i, j, bidirectional_images=True):
    if doc[j] < 0:
        return i == j
    if doc[i] != doc[j]:
        return i == j
    return j <= i or (bidirectional_images and img[i] >= 0 and img[i] == img[j])


def reference_embed(model, inputs):
    """(B*L, D) inputs of the first block, row by row: token embeddings, and at image rows the patch embedding
    plus the timestep embedding plus the 2D sin-cos position; also the image rows and timestep embeddings."""
    cfg = model.config
    B, L = inputs.tokens.shape
    x = model.tok_embed.weight[inputs.tokens].clone()
    flat_mod = inputs.modality.reshape(-1)
    image_rows = [i for i in range(B * L) if flat_mod[i] == cfg.modalities.index("image")]
    t_emb = model.time_embed(inputs.timesteps)
    quarter = cfg.dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    for p, row in enumerate(image_rows):
        r, c = inputs.patch_coords[p].double()
        pos = torch.cat([(r * omega).sin(), (r * omega).cos(), (c * omega).sin(), (c * omega).cos()]).float()
        b, l = divmod(row, L)
        x[b, l] = inputs.patches[p] @ model.patch_embed.weight.T + model.patch_embed.bias \
            + t_emb[inputs.patch_image[p]] + cfg.pos_embed_scale * pos
    return x.reshape(B * L, cfg.dim), image_rows, t_emb


def naive_rope(t, positions, theta):
    """Rotary embedding of (N, H, hd) at `positions` (N,), one angle at a time."""
    hd = t.shape[-1]
    out = t.clone()
    for i in range(t.shape[0]):
        for k in range(hd // 2):
            ang = positions[i].item() * theta ** (-2 * k / hd)
            a, b_ = t[i, :, k], t[i, :, k + hd // 2]
            out[i, :, k] = a * math.cos(ang) - b_ * math.sin(ang)
            out[i, :, k + hd // 2] = a * math.sin(ang) + b_ * math.cos(ang)
    return out


def naive_allowed(inputs, bidirectional_images):
    B, L = inputs.tokens.shape
    allowed = torch.zeros(B, L, L, dtype=torch.bool)
    for b in range(B):
        for i in range(L):
            for j in range(L):
                allowed[b, i, j] = naive_mask(inputs.doc_ids[b], inputs.image_ids[b], i, j, bidirectional_images)
    return allowed


def reference_forward(model, inputs):
    cfg = model.config
    B, L = inputs.tokens.shape
    D, H, hd, eps = cfg.dim, cfg.n_heads, cfg.head_size, cfg.norm_eps
    x, image_rows, t_emb = reference_embed(model, inputs)
    mods = inputs.modality.reshape(-1)
    # adaLN: each image row's (shift, scale, gate, ...) from its own image's timestep, one row at a time
    image_of_row = {row: int(inputs.patch_image[p]) for p, row in enumerate(image_rows)}

    def modulation(linear, row, n):
        return (linear.weight @ F.silu(t_emb[image_of_row[row]]) + linear.bias).chunk(n)

    def modulate(h, linear, n, which):  # which: 0 -> (shift, scale) of attention, 1 -> of the FFN
        out = h.clone()
        for row in image_rows:
            parts = modulation(linear, row, n)
            shift, scale = parts[3 * which], parts[3 * which + 1]
            out[row] = h[row] * (1 + scale) + shift
        return out

    def gate(h, linear, which):
        out = h.clone()
        for row in image_rows:
            out[row] = h[row] * modulation(linear, row, 6)[3 * which + 2]
        return out

    def linear(experts, x_):
        return per_token(lambda m, row: pick(experts, m).weight @ row, x_, mods)

    def norm(experts, x_):
        return per_token(lambda m, row: rms(row, pick(experts, m).weight, eps), x_, mods)

    allowed = naive_allowed(inputs, cfg.image_attention == "bidirectional")

    def attention(blk, h):
        qkv = linear(blk.attn.qkv, h)
        q, k, v = qkv[:, :D].reshape(-1, H, hd), qkv[:, D:2 * D].reshape(-1, H, hd), qkv[:, 2 * D:].reshape(-1, H, hd)
        if cfg.qk_norm:
            q = per_token(lambda m, row: rms(row, pick(blk.attn.q_norm, m).weight, eps), q, mods)
            k = per_token(lambda m, row: rms(row, pick(blk.attn.k_norm, m).weight, eps), k, mods)
        positions = inputs.positions.reshape(-1)
        q, k = naive_rope(q, positions, cfg.rope_theta), naive_rope(k, positions, cfg.rope_theta)
        q, k, v = (t.reshape(B, L, H, hd).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B * L, D)
        return linear(blk.attn.out, y)

    def ffn(blk, h):
        def one(m, row):
            e = pick(blk.ffn, m)
            g, u = (e.gate_up.weight @ row).chunk(2)
            return e.down.weight @ (F.silu(g) * u)
        return per_token(one, h, mods)

    for blk in model.blocks:
        if cfg.time_conditioning == "adaln":
            x = x + gate(attention(blk, modulate(norm(blk.attn_norm, x), blk.modulation, 6, 0)), blk.modulation, 0)
            x = x + gate(ffn(blk, modulate(norm(blk.ffn_norm, x), blk.modulation, 6, 1)), blk.modulation, 1)
        elif cfg.norm_placement == "pre":
            x = x + attention(blk, norm(blk.attn_norm, x))
            x = x + ffn(blk, norm(blk.ffn_norm, x))
        else:
            x = x + norm(blk.attn_norm, attention(blk, x))
            x = x + norm(blk.ffn_norm, ffn(blk, x))
    x = norm(model.final_norm, x)
    if cfg.time_conditioning == "adaln":
        x = modulate(x, model.final_modulation, 2, 0)
    # the model never computes padding positions: its hidden states there are zeros
    return x.reshape(B, L, D) * (inputs.doc_ids >= 0)[..., None]


def make_inputs(config, samples, packed=False, seed=0):
    col = Collator(config)
    batch = col.collate_packed(samples) if packed else col.collate_padded(samples)
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 1000, (batch.num_images,), generator=g).float()
    return batch, batch.noised(batch.inputs.patches + torch.randn(batch.inputs.patches.shape, generator=g), t)


def dense_param_count(cfg):
    D, F_, V, pd, hd = cfg.dim, cfg.ffn_dim, cfg.vocab_size, cfg.patch_dim, cfg.head_size
    per_layer = 4 * D * D + 3 * D * F_ + 2 * D + (2 * hd if cfg.qk_norm else 0)
    ends = V * D + (pd * D + D) + (256 * D + D + D * D + D) + D + D * V + (D * pd + pd)
    return cfg.n_layers * per_layer + ends


def randomize_norms(model, seed=1):
    """Norm weights start at 1; make them distinct per modality so a routing mix-up would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.RMSNorm):
                mod.weight.copy_(1 + 0.3 * torch.randn(mod.weight.shape, generator=g))
            if mod is model.image_head:
                mod.weight.normal_(0, 0.02, generator=g)


# -------------------------------------------------------------------------------------------------
# (a) dense baseline


@pytest.mark.parametrize("placement", ["pre", "post"])
@pytest.mark.parametrize("packed", [False, True])
def test_dense_matches_reference_transformer(placement, packed):
    cfg = tiny_config(untie=[], norm_placement=placement)
    model = TransfusionMoT(cfg)
    randomize_norms(model)
    assert sum(p.numel() for p in model.parameters()) == dense_param_count(cfg)
    _, inputs = make_inputs(cfg, random_samples(cfg, n=3), packed=packed)
    with torch.no_grad():
        ours = model(inputs)
        ref = reference_forward(model, inputs)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=2e-5)


def test_dense_matches_reference_with_copied_weights():
    """A dense model and a MoT model with identical expert copies give identical outputs."""
    dense = TransfusionMoT(tiny_config(untie=[]))
    randomize_norms(dense)
    mot = TransfusionMoT(tiny_config(untie=ALL))
    dense_state = dense.state_dict()
    with torch.no_grad():
        for name, p in mot.named_parameters():
            # "blocks.0.ffn.1.down.weight" <- "blocks.0.ffn.0.down.weight"
            parts = name.split(".")
            src = name
            for i, part in enumerate(parts[:-1]):
                if part.isdigit() and isinstance(mot.get_submodule(".".join(parts[:i])), Experts):
                    src = ".".join(parts[:i] + ["0"] + parts[i + 1:])
            p.copy_(dense_state[src])
    _, inputs = make_inputs(dense.config, random_samples(dense.config, n=3))
    with torch.no_grad():
        torch.testing.assert_close(mot(inputs), dense(inputs), atol=1e-5, rtol=1e-5)


# -------------------------------------------------------------------------------------------------
# (b) parameter counts


@pytest.mark.parametrize("untie,groups", [(ALL, ("attn", "ffn", "norm")), (["ffn"], ("ffn",)),
                                          (["ffn", "attn"], ("ffn", "attn"))])
@pytest.mark.parametrize("modalities", [["text", "image"], ["text", "image", "code"]])
def test_untied_parameter_count(untie, groups, modalities):
    cfg = tiny_config(untie=untie, modalities=modalities)
    dense = TransfusionMoT(dataclasses.replace(cfg, untie=[]))
    mot = TransfusionMoT(cfg)
    D, F_, hd = cfg.dim, cfg.ffn_dim, cfg.head_size
    per_layer = {"attn": 4 * D * D, "ffn": 3 * D * F_, "norm": 2 * D + 2 * hd}
    one_copy = cfg.n_layers * sum(per_layer[g] for g in groups) + (D if "norm" in groups else 0)  # + final norm
    extra_copies = len(modalities) - 1
    n_dense = sum(p.numel() for p in dense.parameters())
    n_mot = sum(p.numel() for p in mot.parameters())
    assert n_dense == dense_param_count(cfg)
    assert n_mot - n_dense == extra_copies * one_copy


# -------------------------------------------------------------------------------------------------
# (c) expert isolation


def image_expert_params(model):
    image = model.image_modality
    for mod in model.modules():
        if isinstance(mod, Experts) and len(mod) > 1:
            yield from mod[image].parameters()


def test_image_experts_do_not_touch_text():
    cfg = tiny_config(untie=ALL)
    model = TransfusionMoT(cfg)
    text_only = [Sample([[1, 2, 3, 4, 5]]), Sample([[7, 8]])]
    _, inputs = make_inputs(cfg, text_only)
    with torch.no_grad():
        before = model.lm_head(model(inputs))
        for p in image_expert_params(model):
            p.add_(torch.randn_like(p))
        for mod in (model.patch_embed, model.time_embed, model.image_head):
            for p in mod.parameters():
                p.add_(torch.randn_like(p))
        after = model.lm_head(model(inputs))
    assert torch.equal(before, after)

    # and a text-only batch gives exactly zero gradient on every image expert
    logits = model.lm_head(model(inputs))
    logits.square().mean().backward()
    params = list(image_expert_params(model))
    assert params
    for p in params:
        assert p.grad is None or torch.count_nonzero(p.grad) == 0
    # while the text experts do get gradient (so the check above could fail)
    text_grads = [p.grad for m in model.modules() if isinstance(m, Experts) and len(m) > 1 for p in m[0].parameters()]
    assert all(g is not None and torch.count_nonzero(g) > 0 for g in text_grads)


@pytest.mark.parametrize("untie,adaln", [(ALL, False), (ALL, True), (["ffn"], False)])
def test_without_gradients_an_absent_modality_runs_no_expert_and_changes_nothing(untie, adaln):
    """Sampling: without gradients the image experts are not run on a text-only batch (each gives an empty
    tensor of its width instead), and the hidden states are those of a forward with gradients, where they run
    on zero rows; with heads narrower than the model (n_heads x head_dim != dim), with adaLN, and with shared
    experts (attention and norms) running on several parts."""
    cfg = tiny_config(untie=untie, head_dim=8, time_conditioning="adaln" if adaln else "add")
    model = TransfusionMoT(cfg)
    randomize_norms(model)
    _, inputs = make_inputs(cfg, [Sample([[1, 2, 3, 4, 5]]), Sample([[7, 8]])])
    calls = []
    image = model.image_modality
    for module in model.modules():
        if isinstance(module, Experts) and len(module) > 1:
            module[image].register_forward_hook(lambda *_: calls.append(1))
    with_grad = model(inputs)
    assert calls  # with gradients every expert runs, on zero rows
    calls.clear()
    with torch.no_grad():
        without = model(inputs)
    assert not calls
    torch.testing.assert_close(without, with_grad.detach(), atol=0, rtol=0)


def test_image_experts_do_change_image_outputs():
    """The counterpart: with images present, perturbing image experts must change the result."""
    cfg = tiny_config(untie=ALL)
    model = TransfusionMoT(cfg)
    _, inputs = make_inputs(cfg, random_samples(cfg))
    with torch.no_grad():
        before = model(inputs)
        for p in image_expert_params(model):
            p.add_(torch.randn_like(p))
        assert not torch.allclose(before, model(inputs))


# -------------------------------------------------------------------------------------------------
# (e) sorted routing versus naive per-token gather


def test_sorted_routing_equals_per_token_gather():
    g = torch.Generator().manual_seed(3)
    experts = Experts([torch.nn.Linear(16, 24) for _ in range(3)], 24)
    modality = torch.randint(0, 3, (4, 37), generator=g)
    x = torch.randn(4 * 37, 16, generator=g, requires_grad=True)
    routing = Routing(modality, 3, sort=True)
    ours = routing.unsort(routing.apply(experts, routing.sort(x)))
    ref = per_token(lambda m, row: experts[m](row), x, modality.reshape(-1))
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    grad_out = torch.randn(ours.shape, generator=g)
    (gx_ours,) = torch.autograd.grad(ours, x, grad_out)
    (gx_ref,) = torch.autograd.grad(ref, x, grad_out)
    torch.testing.assert_close(gx_ours, gx_ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("sort", [True, False])
@pytest.mark.parametrize("padded", [True, False])
def test_stream_sort_and_unsort_with_their_gradients_equal_plain_indexing(sort, padded):
    """Routing's sort/un-sort (gathers whose backward is the inverse gather) give what plain boolean and
    integer indexing give, values and gradients, with and without padding (a row of nothing but padding
    too), sorted or not, one modality absent; and the same values for inputs nothing differentiates
    (detached, integer), which take the plain gather."""
    g = torch.Generator().manual_seed(5)
    modality = torch.randint(0, 2, (4, 11), generator=g) * 2  # modalities 0 and 2 of 3: 1 is absent
    padding = torch.zeros(4, 11, dtype=torch.bool)
    if padded:
        padding[0, 7:] = padding[2, 4:] = True
        padding[3] = True
    routing = Routing(modality, 3, sort=sort, padding=padding)
    flat, real = modality.reshape(-1), ~padding.reshape(-1)
    # the reference stream: real positions, in modality order (stable) when sorted
    rows = ([p for m in range(3) for p in range(44) if real[p] and flat[p] == m] if sort
            else real.nonzero().squeeze(1).tolist())
    x = torch.randn(44, 5, generator=g, requires_grad=True)
    parts = routing.sort(x)
    # one part per modality when sorted (the absent one empty), else one part
    part_rows = [[p for p in rows if flat[p] == m] for m in range(3)] if sort else [rows]
    assert [len(part) for part in parts] == [len(r) for r in part_rows]
    for part, r in zip(parts, part_rows):
        torch.testing.assert_close(part, x[r], atol=0, rtol=0)
    stream = routing.join(parts)
    torch.testing.assert_close(stream, x[rows], atol=0, rtol=0)
    grad = torch.randn(stream.shape, generator=g)
    torch.testing.assert_close(torch.autograd.grad(stream, x, grad, retain_graph=True)[0],
                               torch.autograd.grad(x[rows], x, grad)[0], atol=0, rtol=0)
    torch.testing.assert_close(routing.join(routing.sort(x.detach())), x.detach()[rows], atol=0, rtol=0)
    # a gradient through one part only: the other parts' rows (and padding) get zeros
    last = parts[-1]
    g_last = torch.randn(last.shape, generator=g)
    torch.testing.assert_close(torch.autograd.grad(last, x, g_last)[0],
                               torch.autograd.grad(x[part_rows[-1]], x, g_last)[0], atol=0, rtol=0)
    positions = torch.arange(44)
    assert routing.join(routing.sort(positions)).tolist() == rows
    y = torch.randn(len(rows), 5, generator=g, requires_grad=True)
    y_parts = list(y.split(routing.counts)) if sort else [y]
    back = routing.unsort(y_parts)
    ref = torch.zeros(44, 5).index_put((torch.tensor(rows),), y)
    torch.testing.assert_close(back, ref, atol=0, rtol=0)
    grad = torch.randn(back.shape, generator=g)
    torch.testing.assert_close(torch.autograd.grad(back, y, grad)[0], grad[rows], atol=0, rtol=0)
    torch.testing.assert_close(routing.unsort([p.detach() for p in y_parts]), ref.detach(), atol=0, rtol=0)
    assert routing.unsort(routing.sort(positions)).tolist() == [p if real[p] else 0 for p in range(44)]


def test_routing_with_an_absent_modality():
    experts = Experts([torch.nn.Linear(8, 8) for _ in range(3)], 8)
    modality = torch.tensor([[0, 2, 2, 0, 0]])
    x = torch.randn(5, 8)
    routing = Routing(modality, 3, sort=True)
    ours = routing.unsort(routing.apply(experts, routing.sort(x)))
    ref = per_token(lambda m, row: experts[m](row), x, modality.reshape(-1))
    torch.testing.assert_close(ours, ref)


def test_join_leaves_out_empty_parts_only_without_gradients():
    """A denoising step holds image tokens only: without gradients the one part with rows is used as it is
    (no copy); with gradients every part stays in, so the absent modality's expert gets a zero gradient."""
    experts = Experts([torch.nn.Linear(4, 6) for _ in range(2)], 6)
    modality = torch.tensor([[1, 1, 1]])
    routing = Routing(modality, 2, sort=True)
    x = torch.randn(3, 4)
    ref = per_token(lambda m, row: experts[m](row), x, modality.reshape(-1))
    with torch.no_grad():
        parts = routing.apply(experts, routing.sort(x))
        assert [tuple(p.shape) for p in parts] == [(0, 6), (3, 6)]
        assert Routing.join(parts) is parts[1]
        torch.testing.assert_close(routing.unsort(parts), ref)
    out = routing.unsort(routing.apply(experts, routing.sort(x)))
    out.square().sum().backward()
    torch.testing.assert_close(out, ref)
    assert experts[0].weight.grad is not None and torch.count_nonzero(experts[0].weight.grad) == 0
    assert torch.count_nonzero(experts[1].weight.grad) > 0


# ["norm"] and ["attn"]: Q/K/V shared with per-modality QK-norms, and the reverse
@pytest.mark.parametrize("untie", [ALL, ["ffn"], ["attn", "norm"], ["norm"], ["attn"]])
def test_mot_model_matches_naive_per_token_reference(untie):
    cfg = tiny_config(untie=untie, modalities=["text", "image", "code"])
    model = TransfusionMoT(cfg)
    randomize_norms(model)
    batch, inputs = make_inputs(cfg, random_samples(cfg, n=3), packed=True)
    # mark a few text tokens as the third modality so all three expert sets run
    mod = inputs.modality.clone()
    mod[(batch.inputs.tokens < 10) & (mod == 0)] = 2
    inputs = dataclasses.replace(inputs, modality=mod)
    with torch.no_grad():
        torch.testing.assert_close(model(inputs), reference_forward(model, inputs), atol=2e-5, rtol=2e-5)


# -------------------------------------------------------------------------------------------------
# options: adaLN timestep conditioning, position-embedding scale, causal image attention


def randomize_modulation(model, seed=2):
    """adaLN starts at zero (identity); give it weights so the reference has something to check."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in [blk.modulation for blk in model.blocks] + [model.final_modulation]:
            module.weight.normal_(0, 0.05, generator=g)
            module.bias.normal_(0, 0.05, generator=g)


@pytest.mark.parametrize("untie", [ALL, []])
@pytest.mark.parametrize("packed", [False, True])
def test_adaln_matches_naive_reference(untie, packed):
    cfg = tiny_config(untie=untie, time_conditioning="adaln", pos_embed_scale=0.3)
    model = TransfusionMoT(cfg)
    randomize_norms(model)
    randomize_modulation(model)
    _, inputs = make_inputs(cfg, random_samples(cfg, n=3), packed=packed)
    with torch.no_grad():
        torch.testing.assert_close(model(inputs), reference_forward(model, inputs), atol=2e-5, rtol=2e-5)


def test_adaln_starts_as_identity_on_image_blocks_and_is_per_image():
    """adaLN-Zero: at init every image token's block output equals its input; once trained, image
    tokens of two images with different timesteps are modulated differently, text tokens never."""
    cfg = tiny_config(time_conditioning="adaln")
    model = TransfusionMoT(cfg)
    assert all(torch.count_nonzero(blk.modulation.weight) == 0 for blk in model.blocks)
    _, inputs = make_inputs(cfg, [Sample([[1, 2, 3], torch.randn(4, 4, 4)])])
    routing = Routing(inputs.modality, cfg.num_modalities, sort=True)
    mod = model.image_modulation(inputs)
    modality_parts = routing.sort(inputs.modality.reshape(-1))
    img, text = model.image_modality, model.text_modality
    assert (modality_parts[img] == img).all() and (modality_parts[text] == text).all()  # one part per modality
    from transfusion_mot.masks import AttentionMask, transfusion_mask_mod
    from transfusion_mot.model import rope_tables

    attn_mask = AttentionMask(transfusion_mask_mod(inputs.doc_ids, inputs.image_ids), 1, inputs.tokens.shape[1],
                              inputs.tokens.shape[1], torch.device("cpu"), "sdpa")
    x = routing.sort(model.embed(inputs))
    rope = rope_tables(inputs.positions, cfg.head_size, cfg.rope_theta)
    with torch.no_grad():
        y = model.blocks[0](x, routing, tuple(inputs.tokens.shape), rope, attn_mask, None, mod)
    assert torch.equal(y[img], x[img]) and not torch.equal(y[text], x[text])


def test_causal_image_attention_is_the_only_difference_in_the_mask():
    cfg = tiny_config()
    batch, inputs = make_inputs(cfg, random_samples(cfg, n=3))
    from transfusion_mot.masks import dense_mask, transfusion_mask_mod

    B, L = inputs.tokens.shape
    bi = dense_mask(transfusion_mask_mod(inputs.doc_ids, inputs.image_ids), B, L, L, torch.device("cpu"))[:, 0]
    causal = dense_mask(transfusion_mask_mod(inputs.doc_ids, inputs.image_ids, bidirectional_images=False), B, L, L,
                        torch.device("cpu"))[:, 0]
    tri = torch.ones(L, L, dtype=torch.bool).tril()
    assert torch.equal(causal, bi & (tri | torch.eye(L, dtype=torch.bool)))  # causal: nothing above the diagonal
    same_image = (inputs.image_ids[:, :, None] == inputs.image_ids[:, None, :]) & (inputs.image_ids[:, :, None] >= 0)
    assert torch.equal(bi & ~causal, same_image & ~tri)  # what is lost: later patches of the same image
    model = TransfusionMoT(dataclasses.replace(cfg, image_attention="causal"))
    randomize_norms(model)
    with torch.no_grad():
        torch.testing.assert_close(model(inputs), reference_forward(model, inputs), atol=2e-5, rtol=2e-5)


def test_option_values_are_checked():
    from transfusion_mot.common.errors import ConfigError

    with pytest.raises(ConfigError, match="time_conditioning must be one of"):
        tiny_config(time_conditioning="film")
    with pytest.raises(ConfigError, match="image_attention must be one of"):
        tiny_config(image_attention="full")
    with pytest.raises(ConfigError, match="needs norm_placement pre"):
        tiny_config(time_conditioning="adaln", norm_placement="post")
    with pytest.raises(ConfigError, match="pos_embed_scale"):
        tiny_config(pos_embed_scale=float("nan"))


def test_adaln_parameters_are_image_side_and_per_image_in_accounting():
    from transfusion_mot.accounting import parameter_accounting

    plain = parameter_accounting(TransfusionMoT(tiny_config()))
    adaln = parameter_accounting(TransfusionMoT(tiny_config(time_conditioning="adaln")))
    D, n_layers = 64, 2
    extra = n_layers * (D * 6 * D + 6 * D) + (D * 2 * D + 2 * D)
    assert adaln["total_params"] - plain["total_params"] == extra
    assert adaln["params_per_modality"]["image"] - plain["params_per_modality"]["image"] == extra
    assert adaln["active_params_per_token"] == plain["active_params_per_token"]  # run once per image


# -------------------------------------------------------------------------------------------------
# bad input


def test_bad_inputs_raise_value_errors():
    cfg = tiny_config()
    model = TransfusionMoT(cfg)
    col = Collator(cfg)
    with pytest.raises(ValueError, match="image latent must be"):
        col.collate_padded([Sample([[1, 2], torch.randn(3, 4, 4)])])
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        col.collate_padded([Sample([[1, 2], torch.randn(4, 5, 4)])])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        col.collate_padded([Sample([[1, cfg.vocab_size]])])
    with pytest.raises(ValueError, match="more than the context"):
        col.collate_padded([Sample([list(range(10)) * 13])])

    batch, inputs = make_inputs(cfg, random_samples(cfg))
    with pytest.raises(ValueError, match="token ids must be in"):
        model(dataclasses.replace(inputs, tokens=inputs.tokens.clone().fill_(cfg.vocab_size)))
    with pytest.raises(ValueError, match="patches must be"):
        model(dataclasses.replace(inputs, patches=inputs.patches[:, :-1]))
    with pytest.raises(ValueError, match="image positions in the sequence but"):
        model(dataclasses.replace(inputs, patches=inputs.patches[:-1]))
    long = torch.zeros(1, cfg.max_seq_len + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model(dataclasses.replace(inputs, tokens=long, modality=long, positions=long, doc_ids=long, image_ids=long - 1,
                                  patches=inputs.patches[:0]))


@pytest.mark.parametrize("untie", [["attn", "ffn", "norm"], ["ffn"]])
def test_copied_experts_make_mot_the_dense_model_at_step_0(untie):
    """expert_init copy draws only the text experts, so the random stream is the dense model's: every shared
    weight is the dense model's value, each expert copy equals it, and the losses are the dense model's."""
    from transfusion_mot.diffusion import make_objective
    from transfusion_mot.losses import transfusion_loss

    cfg = tiny_config(expert_init="copy", untie=untie)
    torch.manual_seed(3)
    mot = TransfusionMoT(cfg)
    torch.manual_seed(3)
    dense = TransfusionMoT(dataclasses.replace(cfg, untie=[]))
    dense_state = dense.state_dict()
    for name, value in mot.state_dict().items():
        parts = name.split(".")
        # an expert copy m of an untied group -> the dense model's single copy 0
        shared = ".".join(p if not (p.isdigit() and parts[i - 1] in ("qkv", "out", "q_norm", "k_norm", "attn_norm",
                                                                        "ffn_norm", "ffn", "final_norm")) else "0"
                          for i, p in enumerate(parts))
        assert torch.equal(value, dense_state[shared]), name
    batch = Collator(cfg).collate_padded(random_samples(cfg, n=4))
    out = [transfusion_loss(m, batch, make_objective(cfg), torch.Generator().manual_seed(0)) for m in (mot, dense)]
    for key in ("loss", "text_loss", "image_loss"):
        torch.testing.assert_close(out[0][key], out[1][key], rtol=1e-6, atol=1e-6)
    torch.manual_seed(3)
    random = TransfusionMoT(dataclasses.replace(cfg, expert_init="random"))
    assert torch.equal(random.tok_embed.weight, dense.tok_embed.weight)  # drawn first: the same seed's value
    assert not torch.equal(random.lm_head.weight, dense.lm_head.weight)  # after its own experts' draws
    assert not torch.equal(random.blocks[0].ffn[1].down.weight, random.blocks[0].ffn[0].down.weight)


def test_grouped_query_attention_matches_repeated_heads():
    """n_kv_heads < n_heads: query head j reads key/value head j // (H / KV), as with the keys and values
    repeated per group (transformers' repeat_kv); head_dim may differ from dim / n_heads."""
    cfg = tiny_config(n_kv_heads=2, head_dim=24)
    torch.manual_seed(0)
    gqa = TransfusionMoT(cfg).eval()
    full = TransfusionMoT(dataclasses.replace(cfg, n_kv_heads=4)).eval()
    state = gqa.state_dict()
    hd, h, kv = 24, 4, 2
    for name, value in list(state.items()):
        if ".attn.qkv." in name:
            q, k, v = value.split([h * hd, kv * hd, kv * hd])
            rep = [t.reshape(kv, hd, -1).repeat_interleave(h // kv, 0).reshape(h * hd, -1) for t in (k, v)]
            state[name] = torch.cat([q, *rep])
    full.load_state_dict(state)
    batch = Collator(cfg).collate_padded(random_samples(cfg, n=3))
    inputs = batch.noised(batch.inputs.patches, torch.full((batch.num_images,), 10.0))
    with torch.no_grad():
        torch.testing.assert_close(gqa(inputs), full(inputs), rtol=1e-5, atol=1e-5)
    assert gqa.blocks[0].attn.qkv[0].weight.shape == ((4 + 2 * 2) * 24, 64)
    with pytest.raises(Exception, match="multiple of n_kv_heads"):
        tiny_config(n_kv_heads=3)


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # torch's own, on bf16 input
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("eps", [1e-5, None])
@pytest.mark.parametrize("affine", [True, False])
def test_rmsnorm_function_equals_torch_rmsnorm(dtype, eps, affine):
    """Our RMSNorm (explicit backward) gives nn.RMSNorm's outputs and gradients: fp32 (which saves the
    normalised x), and bf16 inputs with fp32 weights (autocast on a CPU; x saved), with and without eps,
    with and without a weight (the per-modality QK-norm's weightless norm)."""
    from transfusion_mot.model import RMSNorm

    g = torch.Generator().manual_seed(0)
    ours = RMSNorm(24, eps=eps, elementwise_affine=affine)
    ref = torch.nn.RMSNorm(24, eps=eps, elementwise_affine=affine)
    if affine:
        with torch.no_grad():
            ours.weight.copy_(torch.randn(24, generator=g))
            ref.weight.copy_(ours.weight)
    x = (torch.randn(5, 7, 24, generator=g) * 3).to(dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), ref(xb)
    assert ya.dtype == yb.dtype
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(ya, yb, **tol)
    grad = torch.randn(ya.shape, generator=g).to(ya.dtype)
    ga = torch.autograd.grad(ya, [xa, ours.weight] if affine else [xa], grad)
    gb = torch.autograd.grad(yb, [xb, ref.weight] if affine else [xb], grad)
    for a, b in zip(ga, gb):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_function_equals_the_composite_rotation(dtype):
    """The eager RoPE (one autograd node writing both halves) gives the composite's outputs and input
    gradients (the formula compile runs), on a strided view as q and k are, in fp32 and bf16."""
    from transfusion_mot.model import RotaryFunction, rope_tables

    def composite(x, cos, sin):
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)

    g = torch.Generator().manual_seed(0)
    positions = torch.randint(0, 200, (2, 7), generator=g)
    cos, sin = rope_tables(positions, 16, 10000.0)
    qkv = torch.randn(2, 7, 3 * 4 * 16, generator=g).to(dtype)
    qkv_a, qkv_b = qkv.clone().requires_grad_(), qkv.clone().requires_grad_()
    # the k of a fused projection: a strided view, as in the model
    xa, xb = (t[..., 4 * 16:2 * 4 * 16].unflatten(-1, (4, 16)) for t in (qkv_a, qkv_b))
    ya, yb = RotaryFunction.apply(xa, cos, sin), composite(xb, cos, sin)
    assert ya.dtype == yb.dtype == dtype and ya.shape == yb.shape
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    torch.testing.assert_close(ya, yb, **tol)
    grad = torch.randn(ya.shape, generator=g).to(dtype)
    (ga,), (gb,) = torch.autograd.grad(ya, [qkv_a], grad), torch.autograd.grad(yb, [qkv_b], grad)
    assert ga.dtype == gb.dtype == dtype and ga[..., 4 * 16:2 * 4 * 16].abs().sum() > 0
    torch.testing.assert_close(ga, gb, **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_swiglu_function_equals_the_composite(dtype):
    """The eager SwiGLU activation (its backward writes both halves' gradients into one buffer): gradcheck
    in float64, and the composite's outputs and gradients in bf16 (autocast's dtype)."""
    from transfusion_mot.model import SwiGLUFunction

    g = torch.Generator().manual_seed(0)
    gate_up = (torch.randn(9, 2 * 6, generator=g, dtype=torch.float64) * 2).to(dtype)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(SwiGLUFunction.apply, (gate_up.clone().requires_grad_(),))
    a, b = gate_up.clone().requires_grad_(), gate_up.clone().requires_grad_()
    gate, up = b.chunk(2, dim=-1)
    ya, yb = SwiGLUFunction.apply(a), F.silu(gate) * up
    torch.testing.assert_close(ya, yb, atol=0, rtol=0)
    grad = torch.randn(ya.shape, generator=g, dtype=torch.float64).to(dtype)
    (ga,), (gb,) = torch.autograd.grad(ya, [a], grad), torch.autograd.grad(yb, [b], grad)
    tol = {"atol": 1e-12, "rtol": 1e-12} if dtype == torch.float64 else {"atol": 1e-2, "rtol": 1e-2}
    torch.testing.assert_close(ga, gb, **tol)
