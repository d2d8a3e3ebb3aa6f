"""The README's examples run as written, at toy sizes: its placeholders (`data/mine`, `vae32`) are made here
as tiny fixtures and the step counts are cut by a flag appended at the end (argparse keeps the last one)."""

import json
import shlex
import subprocess
import sys
from pathlib import Path

import yaml
from helpers import make_training_data
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def readme_command(start: str, whole_line: bool = False) -> list[str]:
    """The first README command that starts with `start` (or, with whole_line, is exactly it): continuation
    lines joined, the comment cut, split as the shell splits it (so a quoting mistake in the README fails)."""
    lines = README.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.rstrip() == start if whole_line else line.startswith(start):
            command = line
            while command.rstrip().endswith("\\"):
                i += 1
                command = command.rstrip()[:-1] + " " + lines[i].strip()
            words, optional = [], False  # `[--flag value]` marks optional words: left out
            for word in shlex.split(command, comments=True):
                optional = optional or word.startswith("[")
                if not optional:
                    words.append(word)
                optional = optional and not word.endswith("]")
            return words
    raise AssertionError(f"no README command starts with {start!r}")


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    assert argv[0] == "tmot"
    return subprocess.run([sys.executable, "-m", "transfusion_mot", *argv[1:]], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_training_on_your_data_runs_as_written(tmp_path):
    d = make_training_data(tmp_path / "fixtures")
    (tmp_path / "data").mkdir()
    d["folder"].rename(tmp_path / "data" / "mine")
    d["vae"].rename(tmp_path / "vae32")

    encode = run(readme_command("tmot vae encode --vae vae32 --data data/mine --split train"), tmp_path)
    assert encode.returncode == 0, encode.stderr
    train = readme_command("tmot train --config shapes-tiny --out runs/mine --data latents/mine")
    assert "--max-steps" in train and "model.untie=[]" in train
    result = run([*train, "--max-steps", "3", "--no-progress"], tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs" / "mine"
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 3
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["tokenizer"]["path"] == str((run_dir / "tokenizer.json").resolve())
    from transfusion_mot.tokenizer import HFTokenizer

    assert saved["model"]["vocab_size"] == HFTokenizer(run_dir / "tokenizer.json").vocab_size
    assert saved["model"]["untie"] == [] and saved["optim"]["lr"] == 3e-4
    # no held-out set: said once, and the run trained on without held-out losses
    assert result.stderr.count("training without held-out losses") == 1
    assert "validation" not in json.loads((run_dir / "summary.json").read_text())

    # a resume keeps the run's own tokenizer (trained once) and its model size
    before = (run_dir / "tokenizer.json").read_bytes()
    resumed = run(["tmot", "train", "--out", "runs/mine", "--resume", "--max-steps", "5", "--no-progress"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "[tokenizer]" not in resumed.stderr and (run_dir / "tokenizer.json").read_bytes() == before
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 5


def test_the_first_hour_runs_as_written(tmp_path):
    """Data -> VAE -> latents -> training -> sampling, captioning, export: the README's commands in the order
    a new user runs them, each cut to toy size by the flags appended here."""
    toy = {
        "tmot data shapes --out data/shapes": ["--num", "40"],
        "tmot data tokenizer --data data/shapes": [],
        "tmot vae train --config tiny-32 --data data/shapes": ["--max-steps", "2"],
        "tmot vae encode --vae vae32 --data data/shapes": [],
        "tmot vae reconstruct --vae vae32": [],
        "tmot train --config shapes-tiny --out runs/shapes-tiny": [
            "--max-steps", "2", "--no-progress", "--set", "data.builtin_num_images=60",
            "--set", "data.builtin_vae_steps=2"],
        "tmot sample --run runs/shapes-tiny --prompt": ["--steps", "2"],
        "tmot caption --run runs/shapes-tiny": [],
        "tmot export --run runs/shapes-tiny --out shapes-tiny-model": [],
        "tmot sample --run shapes-tiny-model": ["--steps", "2", "--out", "samples-export/"],
        "tmot info --config 760m": [],
        "tmot eval fid --real data/shapes/images --fake samples/ --json": [],
        "tmot eval fid --real data/shapes/images --save-stats shapes_ref.npz": [],
        "tmot data folder --src photos/ --out data/photos --size 64\n": [],
        "tmot data folder --src photos/ --out data/photos --size 64 --max-pixels": ["--out", "data/photos-2"],
    }
    photos = tmp_path / "photos"  # your own images: three photos with sidecar captions, one of them too small
    photos.mkdir()
    for i, (size, text) in enumerate([(96, "a red kite"), (80, "a green field"), (40, "a tiny stamp")]):
        Image.new("RGB", (size + 10, size), (40 * i, 200 - 50 * i, 90)).save(photos / f"p{i}.jpg")
        (photos / f"p{i}.txt").write_text(text)
    outputs = {}
    for start, flags in toy.items():
        result = run([*readme_command(start.rstrip("\n"), whole_line=start.endswith("\n")), *flags], tmp_path)
        assert result.returncode == 0, f"{start}: {result.stderr[-2000:]}"
        outputs[start] = result.stdout
    fid = json.loads(outputs["tmot eval fid --real data/shapes/images --fake samples/ --json"])
    assert fid["n_fake"] == 8 and fid["fid"] > 0 and (tmp_path / "shapes_ref.npz").is_file()
    from transfusion_mot.data.imageio import read_metadata

    assert len(read_metadata(tmp_path / "data" / "photos")) == 3  # every photo, resized to 64 px
    assert sorted(r["text"] for r in read_metadata(tmp_path / "data" / "photos-2")) == ["a green field", "a red kite"]
    assert len(list((tmp_path / "samples").glob("*.png"))) >= 8 and (tmp_path / "recon.png").is_file()
    assert (tmp_path / "shapes-tiny-model" / "pipeline.json").is_file()
    # the model config given by path is the repository's own file: run where the README runs it
    info = run(readme_command("tmot info --config configs/model/760m.yaml"), ROOT)
    assert info.returncode == 0 and '"total_params"' in info.stdout, info.stderr
