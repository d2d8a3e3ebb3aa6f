"""Held-out losses: fixed draws (identical across calls, runs and batch sizes), a naive reference, and the
validation records of a training run."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import make_config, make_training_data, tiny_config

from transfusion_mot.batch import IGNORE_INDEX, Collator, Sample, patchify
from transfusion_mot.common.errors import ConfigError
from transfusion_mot.data.sources import open_source
from transfusion_mot.diffusion import make_objective
from transfusion_mot.losses import transfusion_loss
from transfusion_mot.model import TransfusionMoT
from transfusion_mot.recipes.train import build_trainer, train
from transfusion_mot.tokenizer import ByteTokenizer
from transfusion_mot.training.validation import NUM_BUCKETS, ValidationSet, bucket_names, stratified_timesteps

CAPTIONS = ["a red circle", "a blue square", "a small green cross", "two yellow triangles", "white", ""]


def pairs(n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 4, 4, generator=g), CAPTIONS[i % len(CAPTIONS)]) for i in range(n)]


def model_and_set(objective="ddpm", batch_size=4, seed=7, n=10, model_seed=0):
    cfg = tiny_config(vocab_size=261, objective=objective)
    torch.manual_seed(model_seed)
    model = TransfusionMoT(cfg)
    for name, p in model.named_parameters():  # a non-trivial image head (it starts at zero)
        if "image_head" in name:
            torch.nn.init.normal_(p, std=0.05)
    valset = ValidationSet(pairs(n), ByteTokenizer(), Collator(cfg), make_objective(cfg), seed=seed,
                           batch_size=batch_size)
    return model, valset


def loss_fn(model):
    objective = make_objective(model.config)
    return lambda batch, **draws: transfusion_loss(model, batch, objective, None, **draws)


def test_stratified_timesteps_cover_every_quarter():
    for n in (4, 10, 37, 256):
        t = stratified_timesteps(n, 1000, torch.Generator().manual_seed(0), discrete=True)
        assert t.min() >= 0 and t.max() <= 999 and torch.equal(t, t.floor())
        counts = torch.bincount((t / 250).long(), minlength=4)
        assert counts.max() - counts.min() <= 1, counts
        again = stratified_timesteps(n, 1000, torch.Generator().manual_seed(0), discrete=True)
        assert torch.equal(t, again)
    flow = stratified_timesteps(8, 1000, torch.Generator().manual_seed(0), discrete=False)
    assert not torch.equal(flow, flow.floor())  # continuous sigma * T for flow
    assert bucket_names(1000) == ["t0-250", "t250-500", "t500-750", "t750-1000"]


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_validation_is_identical_across_calls_runs_and_batch_sizes(objective):
    model, valset = model_and_set(objective)
    first = valset.evaluate(loss_fn(model), 5.0)
    assert first == valset.evaluate(loss_fn(model), 5.0)  # same weights, same call: bitwise
    _, rebuilt = model_and_set(objective)  # another run builds its own set from the same seed
    assert first == rebuilt.evaluate(loss_fn(model), 5.0)
    _, other_batching = model_and_set(objective, batch_size=3)  # other padding: equal up to rounding
    other = other_batching.evaluate(loss_fn(model), 5.0)
    assert other.keys() == first.keys()
    for key, value in first.items():
        assert other[key] == pytest.approx(value, rel=1e-5), key
    expected = {"val_loss", "val_text_loss", "val_caption_loss", "val_image_loss"} | {
        f"val_image_loss_{b}" for b in bucket_names(1000)}
    assert set(first) == expected and len(expected) == 4 + NUM_BUCKETS


def test_validation_differs_when_the_weights_or_the_draws_differ():
    model, valset = model_and_set()
    base = valset.evaluate(loss_fn(model), 5.0)
    other_model, _ = model_and_set(model_seed=1)
    for name, p in other_model.named_parameters():
        if "image_head" in name:
            torch.nn.init.normal_(p, std=0.05)
    changed = valset.evaluate(loss_fn(other_model), 5.0)
    for key in ("val_text_loss", "val_caption_loss", "val_image_loss"):
        assert changed[key] != base[key], key
    _, reseeded = model_and_set(seed=8)  # other timesteps and noise: another image loss; captioning sees the
    redrawn = reseeded.evaluate(loss_fn(model), 5.0)  # clean image, so its loss does not move
    assert redrawn["val_image_loss"] != base["val_image_loss"]
    assert redrawn["val_caption_loss"] == base["val_caption_loss"]


def test_validation_matches_a_naive_one_sample_at_a_time_reference():
    """Each sample alone, with the same draws rebuilt by hand from the documented recipe."""
    model, valset = model_and_set(n=10, seed=7)
    result = valset.evaluate(loss_fn(model), 5.0)
    cfg, objective, tok = model.config, make_objective(model.config), ByteTokenizer()
    g = torch.Generator().manual_seed(7)
    data = pairs(10)
    t = stratified_timesteps(10, 1000, g, discrete=True)
    noises = [torch.randn(z.shape, generator=g) for z, _ in data]
    collator = Collator(cfg)
    mses, nll, count, cap_nll, cap_count = [], 0.0, 0, 0.0, 0
    with torch.no_grad():
        for i, (z, text) in enumerate(data):
            ids = tok.encode(text)
            batch = collator.collate_padded([Sample([ids, z])])
            noisy = objective.add_noise(batch.inputs.patches, patchify(noises[i], 2), t[i:i + 1].expand(batch.inputs.patches.shape[0]))
            hidden = model(batch.noised(noisy, t[i:i + 1]))
            pred = model.image_head(hidden[batch.inputs.modality == 1])
            mses.append(((pred - patchify(noises[i], 2)) ** 2).mean().item())
            mask = batch.text_targets != IGNORE_INDEX
            nll += F.cross_entropy(model.lm_head(hidden[mask]), batch.text_targets[mask], reduction="sum").item()
            count += int(mask.sum())
            cap = collator.collate_padded([Sample([z, ids], image_first=True)])
            hidden = model(cap.noised(objective.add_noise(cap.inputs.patches, torch.zeros_like(cap.inputs.patches),
                                                                torch.zeros(cap.inputs.patches.shape[0])), torch.zeros(1)))
            mask = cap.text_targets != IGNORE_INDEX
            cap_nll += F.cross_entropy(model.lm_head(hidden[mask]), cap.text_targets[mask], reduction="sum").item()
            cap_count += int(mask.sum())
    mses = torch.tensor(mses)
    assert result["val_image_loss"] == pytest.approx(mses.mean().item(), rel=1e-5)
    assert result["val_text_loss"] == pytest.approx(nll / count, rel=1e-5)
    assert result["val_caption_loss"] == pytest.approx(cap_nll / cap_count, rel=1e-5)
    assert result["val_loss"] == pytest.approx(nll / count + 5.0 * mses.mean().item(), rel=1e-5)
    quarter = (t / 250).long()
    for k, name in enumerate(bucket_names(1000)):
        assert result[f"val_image_loss_{name}"] == pytest.approx(mses[quarter == k].mean().item(), rel=1e-5)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_training_data(tmp_path_factory.mktemp("valdata"))


def val_config(d, **train):
    return make_config(d, data={"val_path": str(d["latents"])},
                       train={"max_steps": 12, "eval_every": 5, "eval_samples": 6, "eval_batch_size": 4, **train})


def test_training_logs_validation_and_it_does_not_change_training(data, tmp_path):
    run = tmp_path / "run"
    train(val_config(data, eval_ema=True), run)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_image_loss" in r]
    assert [r["step"] for r in evals] == [0, 5, 10, 12]  # before the first step, every 5 steps and at the end
    start, *evals = evals
    assert "loss" not in start and "eval_s" in start  # the initial weights: held-out losses only
    assert start["val_ema_image_loss"] == start["val_image_loss"]  # the EMA starts as the weights
    for r in evals:
        assert {"loss", "text_loss", "image_loss", "lr", "tokens_per_s", "train_time_s", "eval_s"} <= r.keys()
        assert all(f"val_image_loss_{b}" in r for b in bucket_names(1000))
        assert r["val_ema_image_loss"] != r["val_image_loss"]  # EMA weights scored separately
    assert start["val_image_loss"] > evals[-1]["val_image_loss"]
    summary = json.loads((run / "summary.json").read_text())["validation"]
    assert summary["samples"] == 6 and summary["evaluations"] == 4 and summary["draw_seed"] == 1234
    assert summary["final"]["step"] == 12 and summary["final"]["val_text_loss"] == evals[-1]["val_text_loss"]
    assert summary["best_image_loss"]["val_image_loss"] == min(r["val_image_loss"] for r in evals)

    plain = tmp_path / "plain"  # evaluation (and swapping EMA weights in and out) leaves training untouched
    train(make_config(data, train={"max_steps": 12}), plain)
    trained = {r["step"]: r["loss"] for r in records if "loss" in r}
    untouched = {json.loads(line)["step"]: json.loads(line)["loss"] for line in (plain / "metrics.jsonl").read_text().splitlines()}
    assert trained == untouched


def test_validation_is_the_same_in_runs_with_other_training_seeds(data, tmp_path):
    """eval_seed, not train.seed, fixes the draws: two runs are scored on identical work."""
    a = build_trainer(val_config(data, seed=0), tmp_path / "a")
    b = build_trainer(val_config(data, seed=5), tmp_path / "b")
    for (ga, ta, na, _), (gb, tb, nb, _) in zip(a.validation.batches, b.validation.batches):
        assert torch.equal(ta, tb) and torch.equal(na, nb) and torch.equal(ga.inputs.patches, gb.inputs.patches)
    b.model.load_state_dict(a.model.state_dict())
    assert a.evaluate() == b.evaluate()


def test_folder_validation_uses_the_val_split(data, tmp_path):
    folder = data["folder"]
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    for row in rows[-4:]:
        row["split"] = "val"
    copy = tmp_path / "images"
    copy.mkdir()
    for row in rows:
        (copy / row["file_name"]).write_bytes((folder / row["file_name"]).read_bytes())
    (copy / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = make_config(data, data={"kind": "folder", "path": str(copy)}, vae={"path": str(data["vae"])},
                         train={"eval_every": 5, "eval_samples": 100})
    trainer = build_trainer(config, tmp_path / "run")
    assert trainer.validation.num_samples == 4 and "split val" in trainer.validation.source
    assert set(trainer.evaluate()) >= {"val_image_loss", "val_text_loss"}


def test_missing_validation_data_is_said_once_and_training_goes_on(data, tmp_path, capsys):
    """eval_every with no held-out set (a latent cache without data.val_path, a folder without val rows):
    one note naming what is missing, and a run without held-out losses."""
    assert build_trainer(make_config(data, train={"eval_every": 5}), tmp_path / "a").validation is None
    err = capsys.readouterr().err
    assert err.count("training without held-out losses") == 1 and "data.val_path" in err
    with pytest.raises(ConfigError, match="eval_every must be >= 0"):
        make_config(data, train={"eval_every": -1})
    no_val = make_config(data, data={"kind": "folder", "path": str(data["folder"])}, vae={"path": str(data["vae"])},
                         train={"eval_every": 5})
    assert build_trainer(no_val, tmp_path / "b").validation is None
    err = capsys.readouterr().err
    assert err.count("training without held-out losses") == 1 and "no rows of split 'val'" in err
    # the data source itself still refuses, for code that asks for held-out items directly
    with pytest.raises(ConfigError, match="data.val_path"):
        open_source(make_config(data).data).held_out(4, None)




def test_corpus_loss_is_the_mean_next_token_loss_of_the_held_out_documents():
    """val_corpus_loss against a naive reference: each document alone as BOS text EOS, every next-token
    cross-entropy summed, divided by the number of predicted tokens (documents of different lengths and
    batch sizes that split them unevenly)."""
    cfg = tiny_config(vocab_size=261)
    torch.manual_seed(0)
    model = TransfusionMoT(cfg).eval()
    tok = ByteTokenizer()
    texts = ("a round object", "the colour of blood", "x", "")
    docs = [tok.encode(t) for t in texts]
    reference = []
    with torch.no_grad():
        for ids in docs:
            full = [tok.specials.bos, *ids, tok.specials.eos]
            logits = model.text_logits(model(Collator(cfg).collate_padded([Sample([ids])]).noised(
                torch.zeros(0, cfg.patch_dim), torch.zeros(0))))[0, :-1]
            reference.append(F.cross_entropy(logits, torch.tensor(full[1:]), reduction="none"))
    expected = torch.cat(reference).mean().item()
    for batch_size in (1, 3):
        valset = ValidationSet(pairs(2), tok, Collator(cfg), make_objective(cfg), seed=0, batch_size=batch_size,
                               documents=texts)
        result = valset.evaluate(loss_fn(model), 5.0)
        assert result["val_corpus_loss"] == pytest.approx(expected, rel=1e-5)
    assert "val_corpus_loss" not in ValidationSet(pairs(2), tok, Collator(cfg), make_objective(cfg),
                                                  seed=0).evaluate(loss_fn(model), 5.0)


def test_a_run_with_held_out_documents_logs_the_corpus_loss_from_step_0(data, tmp_path):
    docs = tmp_path / "val.txt"
    docs.write_text("a round object that is hit in games\nthe colour of blood\ndraw air into the lungs\n")
    run = tmp_path / "run"
    train(make_config(data, data={"val_path": str(data["latents"]), "text_val_path": str(docs)},
                      train={"max_steps": 5, "eval_every": 5, "eval_samples": 2, "eval_batch_size": 4}), run)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    corpus = [(r["step"], r["val_corpus_loss"]) for r in records if "val_corpus_loss" in r]
    assert [s for s, _ in corpus] == [0, 5]
    summary = json.loads((run / "summary.json").read_text())["validation"]
    assert summary["corpus"]["first"]["val_corpus_loss"] == corpus[0][1]
    assert summary["corpus"]["final"]["perplexity"] == pytest.approx(math.exp(corpus[-1][1]))
    assert "text documents" in summary["source"] and "(2)" in summary["source"]  # eval_samples of them
