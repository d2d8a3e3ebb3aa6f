"""Starting from a pretrained language model: tiny random transformers LMs (Llama with GQA and Llama-3 RoPE
scaling, Qwen2 with Q/K/V biases and no BOS, Qwen3 with QK-norm and a head width of its own, Mistral; tied and
untied embeddings), saved locally, are the reference. The text side must compute what transformers computes,
stay bit-identical when frozen, and come back out as the same transformers model."""

import json

import pytest
import torch
import yaml
from helpers import config_dict, make_tiny_lm, text_only_inputs

from transfusion_mot.batch import Collator, Sample
from transfusion_mot.common.errors import ConfigError, InvalidInput
from transfusion_mot.config import SUPPORTED, resolve_init_from, run_config_from_dict
from transfusion_mot.model import TransfusionMoT, expert_twins, parameter_owners
from transfusion_mot.pretrained import load_lm_weights, text_lm_state_dict, weight_map
from transfusion_mot.run_dir import RunDir
from transfusion_mot.tokenizer import load_tokenizer

IMAGE_KEYS = {"latent_channels": 4, "patch_size": 2}


def lm_model(directory, **keys):
    from transfusion_mot.config import ModelConfig

    config = ModelConfig(**resolve_init_from({"init_from": str(directory), "max_seq_len": 512, **IMAGE_KEYS, **keys}))
    torch.manual_seed(0)
    model = TransfusionMoT(config).eval()
    load_lm_weights(model, directory)
    return model


@pytest.mark.parametrize("arch,tie", [("llama", False), ("llama", True), ("qwen2", True), ("qwen2", False),
                                      ("qwen3", False), ("qwen3", True), ("mistral", False)])
def test_text_logits_equal_transformers(tmp_path, arch, tie):
    lm, _ = make_tiny_lm(tmp_path, arch, tie=tie)
    model = lm_model(tmp_path)
    c = model.config
    assert (c.n_kv_heads, c.tie_embeddings, c.qkv_bias, c.qk_norm) == (2, tie, arch == "qwen2", arch == "qwen3")
    assert c.base_vocab_size == lm.config.vocab_size and c.vocab_size == lm.config.vocab_size + 2
    ids = torch.randint(0, lm.config.vocab_size, (2, 500), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.text_logits(model(text_only_inputs(c, ids)))
        ref = lm(ids).logits
    assert ours.shape[-1] == c.vocab_size  # the LM's vocabulary, then BOI and EOI
    diff = (ours[..., :lm.config.vocab_size] - ref).abs()
    assert diff.max() <= 1e-4
    assert diff[:, 300:].max() <= 1e-4  # far past Llama's original context of 64: RoPE scaling in use
    assert ref.abs().max() > 1e-2  # not a comparison of zeros


def test_dense_and_adaln_models_from_the_lm_compute_the_lm_too(tmp_path):
    lm, _ = make_tiny_lm(tmp_path, "llama")
    ids = torch.randint(0, lm.config.vocab_size, (1, 80), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = lm(ids).logits
        for keys in ({"untie": []}, {"untie": ["ffn"]}, {"time_conditioning": "adaln"}):
            model = lm_model(tmp_path, **keys)
            ours = model.text_logits(model(text_only_inputs(model.config, ids)))[..., :lm.config.vocab_size]
            assert (ours - ref).abs().max() <= 1e-4, keys


def test_image_experts_start_as_copies_of_the_text_experts_or_fresh(tmp_path):
    make_tiny_lm(tmp_path, "qwen3")
    copied = lm_model(tmp_path)
    fresh = lm_model(tmp_path, expert_init="random")
    for model, same in ((copied, True), (fresh, False)):
        pairs = expert_twins(model)
        assert len(pairs) == 2 * (1 + 1 + 2 + 2 + 2) + 1  # per block: qkv, out, q/k norms, 2 norms, ffn (2); final
        assert [torch.equal(a, b) for a, b in pairs] == [same] * len(pairs)
    # the appended rows (BOI, EOI) start at the mean of the LM's rows
    base = copied.tok_embed.weight
    torch.testing.assert_close(copied.new_tok_embed.weight, base.mean(0, keepdim=True).expand(2, -1))


def test_the_mapping_round_trips(tmp_path):
    lm, _ = make_tiny_lm(tmp_path, "qwen2", tie=True)
    model = lm_model(tmp_path)
    back = text_lm_state_dict(model.state_dict(), model.config)
    theirs = lm.state_dict()
    assert set(back) == set(theirs)
    assert all(torch.equal(back[k], theirs[k].float()) for k in theirs)
    assert sum(len(v) for v in weight_map(model.config).values()) == len(theirs) - 1  # tied: no lm_head file


def test_the_lm_tokenizer_keeps_every_id_and_its_bos_convention(tmp_path):
    for arch in ("llama", "qwen2"):
        d = tmp_path / arch
        lm, hf = make_tiny_lm(d, arch)
        model = lm_model(d)
        tok = load_tokenizer(run_config_from_dict({"model": {"init_from": str(d), **IMAGE_KEYS}}).tokenizer,
                             model.config)
        text = "a small red circle above the lazy dog"
        assert tok.encode(text) == hf(text, add_special_tokens=False)["input_ids"]
        sp = tok.specials
        assert (sp.boi, sp.eoi, sp.eos) == (lm.config.vocab_size, lm.config.vocab_size + 1, hf.eos_token_id)
        assert tok.vocab_size == model.config.vocab_size
        batch = Collator(model.config, sp).collate_padded([Sample([tok.encode(text)])])
        # the document is what the LM's own tokenizer makes of it, then EOS
        assert batch.inputs.tokens[0].tolist() == hf(text)["input_ids"] + [hf.eos_token_id]
        assert (sp.bos is None) is (arch == "qwen2")
        assert tok.decode([*tok.encode(text), sp.boi, sp.eoi]) == text


def test_a_config_with_init_from_needs_no_shape_keys_and_refuses_contradicting_ones(tmp_path):
    make_tiny_lm(tmp_path, "llama")
    cfg = run_config_from_dict({"model": {"init_from": str(tmp_path), **IMAGE_KEYS}})
    assert (cfg.model.dim, cfg.model.n_layers, cfg.model.n_kv_heads, cfg.tokenizer.kind) == (32, 2, 2, "pretrained")
    assert run_config_from_dict({"model": {"init_from": str(tmp_path), "dim": 32, **IMAGE_KEYS}}).model.dim == 32
    with pytest.raises(ConfigError, match=r"model.dim is 64 but .* has 32: a config with model.init_from needs no "):
        run_config_from_dict({"model": {"init_from": str(tmp_path), "dim": 64}})
    with pytest.raises(ConfigError, match="tokenizer.kind must be 'pretrained'"):
        run_config_from_dict({"model": {"init_from": str(tmp_path)}, "tokenizer": {"kind": "bytes"}})
    with pytest.raises(ConfigError, match="exceeds the 1024 positions"):
        run_config_from_dict({"model": {"init_from": str(tmp_path), "max_seq_len": 2048}})
    with pytest.raises(ConfigError, match="needs no shape keys"):  # a shipped model file brings shape keys
        run_config_from_dict({"model": {"base": "tiny", "init_from": str(tmp_path)}})


def test_unsupported_models_are_one_line_naming_the_supported_ones(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50)).save_pretrained(str(tmp_path / "gpt2"))
    with pytest.raises(ConfigError, match="architecture GPT2LMHeadModel is not supported") as err:
        run_config_from_dict({"model": {"init_from": str(tmp_path / "gpt2")}})
    assert all(name in str(err.value) for name in SUPPORTED) and "\n" not in str(err.value)
    make_tiny_lm(tmp_path / "yarn", "llama", rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                           "original_max_position_embeddings": 64})
    with pytest.raises(ConfigError, match="rope scaling 'yarn' is not supported"):
        run_config_from_dict({"model": {"init_from": str(tmp_path / "yarn")}})
    make_tiny_lm(tmp_path / "window", "mistral", sliding_window=32)
    with pytest.raises(ConfigError, match=r"sliding-window attention \(32 positions\)"):
        run_config_from_dict({"model": {"init_from": str(tmp_path / "window"), "max_seq_len": 96}})
    with pytest.raises(Exception, match="no config.json"):
        run_config_from_dict({"model": {"init_from": str(tmp_path / "nothing-here")}})


def lm_config_dict(data, lm_dir, **train):
    cd = config_dict(data, train={"max_steps": 6, "save_every": 3, **train})
    cd["model"] = {"init_from": str(lm_dir), "max_seq_len": 96, **IMAGE_KEYS}
    cd["tokenizer"] = {}
    return cd


def test_frozen_text_is_bit_identical_after_training_and_holds_no_optimizer_state(tmp_path, data):
    from transfusion_mot.recipes.train import build_trainer

    lm, hf = make_tiny_lm(tmp_path / "lm", "llama")
    trainer = build_trainer(run_config_from_dict(lm_config_dict(data, tmp_path / "lm", freeze=["text"])), tmp_path / "run")
    model = trainer.model
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([hf("a red circle above the lazy dog")["input_ids"]])
    with torch.no_grad():
        start = model.text_logits(model(text_only_inputs(trainer.config.model, ids)))[..., :lm.config.vocab_size]
    result = trainer.fit()
    owners = parameter_owners(model)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, o in owners.items() if o == "text"} - {"new_tok_embed.weight", "new_lm_head.weight"}
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert not any(id(params[n]) in in_optimizer or params[n] in trainer.optimizer.state for n in frozen)
    assert set(trainer.ema.shadow) == set(params) - frozen
    after = model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in frozen)
    moved = [n for n in after if n not in frozen and not torch.equal(before[n], after[n])]
    assert "new_tok_embed.weight" in moved and any(".attn.qkv.1." in n for n in moved)  # BOI/EOI, image experts
    # the trained run's text logits are the ones it started with, bit for bit, and so the LM's (the same
    # function computed with fused projections: equal to rounding, which depends on the CPU's kernels)
    trained, config, info = RunDir(result.run_dir).load_model()
    assert "frozen parameters from the raw weights" in info["weights"]
    with torch.no_grad():
        ours = trained.text_logits(trained(text_only_inputs(config.model, ids)))[..., :lm.config.vocab_size]
        assert torch.equal(ours, start)
        assert (ours - lm(ids).logits).abs().max() <= 1e-4
    summary = trainer.summary(result)
    assert summary["trainable_parameters"] == sum(params[n].numel() for n in set(params) - frozen)
    assert summary["model"]["freeze"] == ["text"] and summary["model"]["init_from"] == str(tmp_path / "lm")


def test_lr_multipliers_per_owner(tmp_path, data):
    from transfusion_mot.recipes.train import build_trainer

    make_tiny_lm(tmp_path / "lm", "qwen2")
    cd = lm_config_dict(data, tmp_path / "lm", max_steps=3)
    cd["optim"]["lr_mult"] = {"text": 0.1}
    trainer = build_trainer(run_config_from_dict(cd), tmp_path / "run")
    trainer.train_step(5)
    owners = {g.get("owner"): g for g in trainer.optimizer.param_groups}
    assert owners.keys() == {"text", "image"}
    assert owners["text"]["lr"] == pytest.approx(0.1 * owners["image"]["lr"]) and owners["image"]["lr"] > 0
    with pytest.raises(ConfigError, match="unknown parameter owner 'txt'"):
        run_config_from_dict({**cd, "train": {**cd["train"], "freeze": ["txt"]}})
    with pytest.raises(ConfigError, match="freezes every parameter"):
        run_config_from_dict({**cd, "train": {**cd["train"], "freeze": ["text", "image", "shared"]}})


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, data):
    """A Qwen2-style (tied, no BOS) run with the text frozen, 6 steps, checkpoints at 3 and 6."""
    from transfusion_mot.recipes.train import train

    root = tmp_path_factory.mktemp("lmrun")
    lm, hf = make_tiny_lm(root / "lm", "qwen2", tie=True)
    (root / "c.yaml").write_text(yaml.safe_dump(lm_config_dict(data, root / "lm", freeze=["text"])))
    from transfusion_mot.config import load_run_config

    train(load_run_config(root / "c.yaml"), root / "run")
    return root, lm, hf


def test_export_text_lm_gives_the_lm_back(lm_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transfusion_mot.cli import main

    root, lm, hf = lm_run
    assert main(["export", "--run", str(root / "run"), "--text-lm", str(tmp_path / "lm")]) == 0
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "lm")).eval()
    assert type(back).__name__ == "Qwen2ForCausalLM"
    ids = torch.tensor([hf("a blue circle and words")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(back(ids).logits, lm(ids).logits)
    assert AutoTokenizer.from_pretrained(str(tmp_path / "lm"))("a red square")["input_ids"] == hf("a red square")["input_ids"]
    assert main(["export", "--run", str(root / "run")]) != 0  # neither --out nor --text-lm
    assert "give --out" in capsys.readouterr().err


def test_every_command_works_on_a_run_started_from_an_lm(lm_run, tmp_path, capsys):
    from transfusion_mot.cli import main
    from transfusion_mot.inference.pipeline import Pipeline

    root, _, _ = lm_run
    run = root / "run"
    # the run needs neither the LM's directory nor the Hub: it keeps the LM's config and tokenizer
    assert (run / "text_lm" / "config.json").is_file() and (run / "text_lm" / "tokenizer.json").is_file()
    assert main(["sample", "--run", str(run), "--prompt", "a red square", "--n", "2", "--steps", "3",
                 "--out", str(tmp_path / "s")]) == 0
    assert len(list((tmp_path / "s").glob("0000*.png"))) == 2
    assert main(["caption", "--run", str(run), str(tmp_path / "s" / "00000.png"), "--max-new-tokens", "4",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])[0]["image"].endswith("00000.png")
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "pipe")]) == 0
    a, b = Pipeline.from_run(run), Pipeline.from_pretrained(tmp_path / "pipe")
    assert torch.equal(a.generate_latents(["a blue circle"], seed=3, num_steps=3),
                       b.generate_latents(["a blue circle"], seed=3, num_steps=3))
    assert "text_lm" not in str(b.tokenizer.source) and b.tokenizer.specials == a.tokenizer.specials
    card = (tmp_path / "pipe" / "README.md").read_text()
    assert f"| started from | {root / 'lm'} (its tokenizer" in card and "| frozen during training | text |" in card
    # resume: the weights come from the checkpoint, not again from the LM
    from transfusion_mot.config import load_run_config
    from transfusion_mot.recipes.train import build_trainer

    resumed = build_trainer(load_run_config(root / "c.yaml", ["train.max_steps=8"]), run, resume=True)
    assert resumed.resumed_from.name == "step_6" and resumed.progress.step == 6


def test_resume_of_a_run_started_from_an_lm_is_exact(tmp_path, data):
    from helpers import losses

    from transfusion_mot.config import load_run_config
    from transfusion_mot.recipes.train import train

    make_tiny_lm(tmp_path / "lm", "qwen3")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(lm_config_dict(data, tmp_path / "lm")))
    train(load_run_config(tmp_path / "c.yaml"), tmp_path / "whole")
    train(load_run_config(tmp_path / "c.yaml", ["train.max_steps=3"]), tmp_path / "cut")
    train(load_run_config(tmp_path / "c.yaml"), tmp_path / "cut", resume=True)
    assert losses(tmp_path / "whole") == losses(tmp_path / "cut")


def test_mismatched_tokenizer_and_untakeable_images_are_one_line(tmp_path, data):
    from transfusion_mot.recipes.train import build_trainer

    make_tiny_lm(tmp_path / "lm", "llama")
    from helpers import make_lm_tokenizer

    make_lm_tokenizer(tmp_path / "swapped", specials=("</s>", "<s>", "<pad>"))  # another model's special ids
    make_lm_tokenizer(tmp_path / "bigger", vocab_size=400)  # more tokens than the LM has rows
    cd = lm_config_dict(data, tmp_path / "lm")
    for other, message in (("swapped", r"does not match .*: its BOS id is 1, the model's config says 0"),
                           ("bigger", "tokens but the language model has 307 embedding rows")):
        cd["tokenizer"] = {"path": str(tmp_path / other)}
        with pytest.raises(InvalidInput, match=message):
            build_trainer(run_config_from_dict(cd), tmp_path / f"run-{other}")
    cd = lm_config_dict(data, tmp_path / "lm")
    cd["model"]["patch_size"] = 3  # 8x8 latents cannot be cut into 3x3 patches
    with pytest.raises(ConfigError, match="not divisible by model.patch_size 3"):
        build_trainer(run_config_from_dict(cd), tmp_path / "run2")
    with pytest.raises(ConfigError, match="make 16 image tokens .* no room for a caption in model.max_seq_len 18"):
        build_trainer(run_config_from_dict({**lm_config_dict(data, tmp_path / "lm"), "model": {
            "init_from": str(tmp_path / "lm"), "max_seq_len": 18, **IMAGE_KEYS}}), tmp_path / "run3")
