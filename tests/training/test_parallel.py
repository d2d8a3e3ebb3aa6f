"""Data-parallel training: FSDP2 with meta-device initialisation,
sharded (DCP) checkpoints that one process loads and exports, text-only micro-batches, exact resume on the
same number of processes and re-split resume on another."""

import json
import math
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import cli_env, config_dict, losses

from transfusion_mot.common.checkpoint import load_tensors
from transfusion_mot.model import appended_token_parameters, parameter_owners
from transfusion_mot.run_dir import RunDir, sharded_keys


def torchrun(args, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "transfusion_mot", "train", *args]
    proc = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_two_process_fsdp2_run_writes_a_sharded_checkpoint_one_process_loads_and_exports(tmp_path, data):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(config_dict(data, train={"max_steps": 4, "save_every": 2, "precision": "bf16"})))
    run = tmp_path / "run"
    torchrun(["--config", str(cfg), "--out", str(run)])
    checkpoint = run / "checkpoints/step_4"
    # sharded: each process wrote its own shards (DCP) and its own state; nothing was gathered
    assert {p.name for p in checkpoint.iterdir()} == {"dcp", "rank_0.pt", "rank_1.pt", "state.json"}
    assert json.loads((checkpoint / "state.json").read_text())["world_size"] == 2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["mfu"] is None and 0 <= r["padding_fraction"] < 1 for r in rows)  # CPU: no peak to compare with
    # one process assembles the full weights, raw and EMA, and runs the model
    model, config, info = RunDir(run).load_model(ema=False)
    assert info["step"] == 4 and info["weights"] == "dcp/model"
    ema_model, _, ema_info = RunDir(run).load_model()
    assert ema_info["weights"] == "dcp/ema"
    # the weights moved away from the seed's initialisation in every process's shard
    torch.manual_seed(config.train.seed)
    from transfusion_mot.model import TransfusionMoT

    with torch.device("meta"):
        init = TransfusionMoT(config.model)
    init.to_empty(device="cpu")
    torch.manual_seed(config.train.seed)
    init.reset_parameters()
    init = init.state_dict()
    full = model.state_dict()
    big = [k for k in init if init[k].dim() == 2 and init[k].shape[0] >= 2]
    for k in big:
        half = init[k].shape[0] // 2
        if init[k].abs().sum() > 0:  # (zero-initialised heads move too, but are not distinct per shard)
            assert not torch.equal(init[k][:half], init[k][half:]), k  # shards were initialised differently
        assert not torch.equal(init[k][:half], full[k][:half]) and not torch.equal(init[k][half:], full[k][half:]), k
    # tmot export consolidates the sharded checkpoint into one safetensors file
    out = tmp_path / "exported"
    proc = subprocess.run([sys.executable, "-m", "transfusion_mot", "export", "--run", str(run), "--out", str(out)],
                          env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = load_tensors(out / "model.safetensors")
    assert set(exported) == set(ema_model.state_dict())
    assert all(torch.equal(exported[k], v) for k, v in ema_model.state_dict().items())


@pytest.mark.slow
def test_two_process_resume_is_exact(tmp_path, data):
    """FSDP2 on 2 processes: 3 steps + --resume to 6 == 6 steps straight (bf16, gloo)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(config_dict(data, train={"max_steps": 6, "save_every": 3, "precision": "bf16"})))
    for args in (["--config", str(cfg), "--out", str(tmp_path / "straight")],
                 ["--config", str(cfg), "--out", str(tmp_path / "split"), "--max-steps", "3"],
                 ["--out", str(tmp_path / "split"), "--resume", "--max-steps", "6"]):
        torchrun(args)
    assert losses(tmp_path / "straight") == losses(tmp_path / "split")


@pytest.mark.slow
def test_text_only_micro_batches_do_not_hang_fsdp2(tmp_path, data):
    """One sample per micro-batch, half of them text-only: some steps a process has no image at all, and
    FSDP2 must still reduce the same gradients on both (this died in the first backward before)."""
    corpus = tmp_path / "docs.txt"
    corpus.write_text("".join(f"a text-only document, number {i}\n" for i in range(40)))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(config_dict(
        data, train={"max_steps": 8, "save_every": 8, "batch_size": 1},
        data={"text_only_path": str(corpus), "text_only_ratio": 0.5})))
    torchrun(["--config", str(cfg), "--out", str(tmp_path / "run")])
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    states = [torch.load(tmp_path / f"run/checkpoints/step_8/rank_{r}.pt", weights_only=True) for r in (0, 1)]
    counts = [s["data"]["counts"]["text_only"] for s in states]
    assert min(counts) > 0  # both processes drew text-only samples, so the case was exercised


@pytest.mark.slow
def test_resume_on_another_number_of_processes(tmp_path, data):
    """2 processes -> 1 -> 2: the sharded checkpoint loads exactly into one process (weights, EMA, optimizer),
    a one-process checkpoint resumes on two, and the step count, tokens and losses carry on."""
    from transfusion_mot.config import load_run_config
    from transfusion_mot.recipes.train import build_trainer

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(config_dict(data, train={"max_steps": 3, "save_every": 3})))
    run = tmp_path / "run"
    torchrun(["--config", str(cfg), "--out", str(run)])
    # in this process: the trainer resumed from the 2-process checkpoint holds exactly its state
    trainer = build_trainer(load_run_config(run / "config.yaml"), run, resume=True)
    raw, _, _ = RunDir(run).load_model(ema=False)
    ema, _, _ = RunDir(run).load_model()
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p.detach(), raw.state_dict()[name]), name
        assert torch.equal(trainer.ema.shadow[name], ema.state_dict()[name]), name
        assert trainer.optimizer.state[p]["exp_avg"].abs().sum() > 0, name
    assert trainer.progress.step == 3
    # 1 process continues to step 5 (full-file checkpoint), then 2 processes to step 7 (sharded again)
    proc = subprocess.run([sys.executable, "-m", "transfusion_mot", "train", "--out", str(run), "--resume",
                           "--max-steps", "5", "--set", "train.save_every=5"], env=cli_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "written by 2 processes, resuming on 1" in proc.stdout
    assert (run / "checkpoints/step_5/model.safetensors").is_file()
    torchrun(["--out", str(run), "--resume", "--max-steps", "7", "--set", "train.save_every=7"])
    assert (run / "checkpoints/step_7/dcp").is_dir()
    steps = losses(run)
    assert sorted(steps) == list(range(1, 8))
    assert all(all(math.isfinite(v) for v in values) for values in steps.values())
    state = json.loads((run / "checkpoints/step_7/state.json").read_text())
    assert state["world_size"] == 2 and state["tokens_seen"] > 0


def test_two_process_fsdp2_run_from_a_language_model_with_the_text_frozen(tmp_path, data):
    """LMFusion under FSDP2: the LM's weights are loaded into every process's shards, the frozen text side
    is sharded like the rest and nothing hangs; one process reads the text side back bit-identical to the LM,
    the EMA holds the trained parameters only, and the image experts (copies of the text experts) moved."""
    from helpers import make_tiny_lm, text_only_inputs

    lm, hf = make_tiny_lm(tmp_path / "lm", "llama")
    cd = config_dict(data, train={"max_steps": 3, "save_every": 3, "freeze": ["text"]})
    cd["model"], cd["tokenizer"] = {"init_from": str(tmp_path / "lm"), "max_seq_len": 96, "latent_channels": 4,
                                    "patch_size": 2}, {}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cd))
    run = tmp_path / "run"
    torchrun(["--config", str(tmp_path / "c.yaml"), "--out", str(run)])
    checkpoint = run / "checkpoints/step_3"
    assert (checkpoint / "dcp").is_dir()
    averaged = sharded_keys(checkpoint, "ema")
    model, config, info = RunDir(run).load_model()
    frozen = {n for n, owner in parameter_owners(model).items() if owner == "text"} - appended_token_parameters(model)
    assert averaged == set(dict(model.named_parameters())) - frozen and frozen
    from transfusion_mot.model import TransfusionMoT
    from transfusion_mot.pretrained import load_lm_weights

    fresh = TransfusionMoT(config.model)  # the model as it starts: the LM's weights, untrained
    load_lm_weights(fresh, tmp_path / "lm")
    ids = torch.tensor([hf("a red circle above the lazy dog")["input_ids"]])
    with torch.no_grad():
        ours, start = (m.text_logits(m(text_only_inputs(config.model, ids)))[..., :lm.config.vocab_size]
                       for m in (model, fresh))
        assert torch.equal(ours, start)  # bit for bit; and the LM's function (fused projections: to rounding)
        assert (ours - lm(ids).logits).abs().max() <= 1e-4
    block = model.blocks[0]
    assert not torch.equal(block.ffn[1].down.weight, block.ffn[0].down.weight)


@pytest.mark.parametrize("untie", [["attn", "ffn", "norm"], []])
def test_compiled_blocks_equal_eager_with_padding_and_compile_once(untie):
    """The blocks as train.compile compiles them (dynamic shapes; traced through AOTAutograd here, without
    inductor's C++ build) give the eager model's loss and gradients on padded batches of changing shapes
    with one graph and no graph break; a batch without padding (no zero rows to append) is a second graph."""
    from helpers import random_samples, tiny_config

    from transfusion_mot.batch import Collator
    from transfusion_mot.common.compile import compile_counts
    from transfusion_mot.diffusion import make_objective
    from transfusion_mot.losses import TransfusionStep
    from transfusion_mot.model import TransfusionMoT

    config = tiny_config(untie=untie)
    torch.manual_seed(0)
    eager = TransfusionMoT(config)
    compiled = TransfusionMoT(config)
    compiled.load_state_dict(eager.state_dict())
    torch._dynamo.reset()
    before = compile_counts()
    for block in compiled.blocks:
        block.compile(dynamic=True, backend="aot_eager")
    objective = make_objective(config)
    batches = [Collator(config).collate_padded(random_samples(config, n=n, seed=seed))  # padded, shapes change
               for n, seed in ((3, 0), (5, 1), (2, 2))]
    batches.append(Collator(config).collate_padded(random_samples(config, n=3, seed=3, caption=(5, 6), latent=(4,))))
    assert [bool((b.inputs.doc_ids < 0).any()) for b in batches] == [True, True, True, False]
    graphs = []
    for seed, batch in enumerate(batches):
        grads = []
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            loss = TransfusionStep(model, objective)(batch, torch.Generator().manual_seed(seed))["loss"]
            loss.backward()
            grads.append((loss.detach(), [p.grad for p in model.parameters()]))
        (loss_e, grad_e), (loss_c, grad_c) = grads
        torch.testing.assert_close(loss_c, loss_e, atol=1e-6, rtol=1e-6)
        for a, b in zip(grad_c, grad_e):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        graphs.append(compile_counts()["graphs"] - before["graphs"])
    assert graphs == [1, 1, 1, 2]  # one graph for every block and padded batch; no padding: one more
    counts = compile_counts()
    assert counts["graph_breaks"] == before["graph_breaks"] and counts["failed"] == before["failed"]
