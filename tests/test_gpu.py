"""What only a GPU can show (marked `gpu`, skipped without CUDA): FlexAttention equals SDPA forward and
backward on packed rows, a bf16 compiled training step under FSDP2, and no recompiles across lengths.

Run on a CUDA machine with `python -m pytest -q -m gpu tests/test_gpu.py`."""

import pytest
import torch
from helpers import random_samples, tiny_config

from transfusion_mot.batch import Collator
from transfusion_mot.diffusion import make_objective
from transfusion_mot.losses import transfusion_loss
from transfusion_mot.model import TransfusionMoT

pytestmark = pytest.mark.gpu


def packed(cfg, seed, budget, n=12):
    samples = random_samples(cfg, n=n, seed=seed, caption=(3, 40), latent=(4, 8))
    return Collator(cfg).collate_packed(samples, token_budget=budget)


def test_flex_equals_sdpa_forward_and_backward_on_packed_rows():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    flex = TransfusionMoT(tiny_config(dim=128, max_seq_len=512, attn_backend="flex")).cuda()
    sdpa = TransfusionMoT(tiny_config(dim=128, max_seq_len=512, attn_backend="sdpa")).cuda()
    sdpa.load_state_dict(flex.state_dict())
    batch = packed(flex.config, seed=0, budget=300).to("cuda")
    assert (batch.inputs.doc_ids.max(dim=1).values >= 2).all()  # several documents per row
    objective = make_objective(flex.config)
    out = [transfusion_loss(m, batch, objective, torch.Generator().manual_seed(1)) for m in (flex, sdpa)]
    for key in ("loss", "text_loss", "image_loss"):
        torch.testing.assert_close(out[0][key], out[1][key], rtol=1e-4, atol=1e-5)
    for o in out:
        o["loss"].backward()
    grads = [dict((n, p.grad) for n, p in m.named_parameters()) for m in (flex, sdpa)]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-3, atol=1e-5, msg=name)


def test_bf16_compiled_training_step_with_fsdp2_on_one_gpu(tmp_path):
    """Meta-device init, compiled blocks, FSDP2 with bf16 all-gathers and fp32 reduction, flex attention:
    the loss of a fixed packed batch falls and every gradient is finite."""
    from transfusion_mot.common.compile import compile_blocks
    from transfusion_mot.losses import TransfusionStep
    from transfusion_mot.training.parallel import apply_fsdp

    torch.cuda.set_device(0)
    cfg = tiny_config(dim=128, max_seq_len=512, attn_backend="flex")
    import torch.distributed as dist

    dist.init_process_group("nccl", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        with torch.device("meta"):
            model = TransfusionMoT(cfg)
        step = TransfusionStep(model, make_objective(cfg))
        compile_blocks(model)
        apply_fsdp(step, model.blocks, bf16=True)
        model.to_empty(device="cuda")
        torch.manual_seed(0)
        model.reset_parameters()
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        batch = packed(cfg, seed=1, budget=400).to("cuda")
        losses = []
        for _ in range(8):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = step(batch, torch.Generator().manual_seed(2))
            out["loss"].backward()
            assert all(torch.isfinite(p.grad.full_tensor()).all() for p in model.parameters())
            optimizer.step()
            optimizer.zero_grad()
            losses.append(out["loss"].item())
        assert losses[-1] < 0.7 * losses[0], losses
    finally:
        dist.destroy_process_group()


def test_no_recompiles_across_twenty_steps_of_varying_lengths():
    """Compiled blocks (dynamic routing sizes) with compiled FlexAttention, 4 rows per batch: after one
    batch within a 128-block and one beyond it, 20 batches of new lengths add no graph."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from transfusion_mot.common.compile import compile_blocks

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    cfg = tiny_config(dim=128, max_seq_len=1024, attn_backend="flex")
    model = TransfusionMoT(cfg).cuda()
    compile_blocks(model)
    objective = make_objective(cfg)
    collator = Collator(cfg)
    g = torch.Generator().manual_seed(0)
    captions = [40, 200] + torch.randint(60, 900, (20,), generator=g).tolist()
    graphs = None
    for i, n in enumerate(captions):
        batch = collator.collate_padded(random_samples(cfg, n=4, seed=i, caption=(n // 2, n), latent=(4, 8)))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = transfusion_loss(model, batch.to("cuda"), objective, torch.Generator().manual_seed(i))
        out["loss"].backward()
        model.zero_grad(set_to_none=True)
        if i == 1:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs, "a new length recompiled"
