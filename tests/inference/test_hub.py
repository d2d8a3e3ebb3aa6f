"""The Hugging Face Hub: a hub id loads through huggingface_hub's snapshot (here a fake one serving an
exported directory), offline it is one clear error, and a push creates the repo and uploads the folder."""

import pytest
import torch

from transfusion_mot.cli import main
from transfusion_mot.common.errors import InputNotFound, UserError
from transfusion_mot.inference import hub
from transfusion_mot.inference.pipeline import Pipeline, load_pipeline


def test_a_hub_id_loads_the_same_pipeline_as_its_directory(tiny_run, tmp_path, monkeypatch):
    exported = Pipeline.from_run(tiny_run).save_pretrained(tmp_path / "model")
    asked = []

    def fake_snapshot(repo_id, revision=None):
        asked.append((repo_id, revision))
        return str(exported)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot)
    from_hub = Pipeline.from_pretrained("someone/tiny-mot", revision="v1")
    assert asked == [("someone/tiny-mot", "v1")]
    local = Pipeline.from_pretrained(exported)
    a = from_hub.generate_latents(["a red square"], seed=1, num_steps=3)
    b = local.generate_latents(["a red square"], seed=1, num_steps=3)
    assert torch.equal(a, b)
    assert load_pipeline("someone/tiny-mot").info["source"] == "pretrained"


def test_offline_hub_id_is_one_clear_line(capsys):
    assert hub.is_repo_id("nobody/not-cached") and not hub.is_repo_id("runs/../x/y/z")
    with pytest.raises(InputNotFound, match="nobody/not-cached: cannot get it from the Hugging Face Hub"):
        Pipeline.from_pretrained("nobody/not-cached")  # HF_HUB_OFFLINE=1 in the tests, nothing cached
    assert main(["sample", "--run", "nobody/not-cached", "--prompt", "a red square", "--out", "x"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Hugging Face Hub" in err[0] and "tmot export" in err[0]


def test_export_pushes_the_directory_with_its_card(tiny_run, tmp_path, monkeypatch, capsys):
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, repo_type, private, exist_ok):
            calls.append(("create", repo_id, private))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, folder_path, repo_id, repo_type, commit_message):
            from pathlib import Path

            calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    out = tmp_path / "model"
    assert main(["export", "--run", str(tiny_run), "--out", str(out), "--push-to-hub", "someone/tiny-mot",
                 "--private"]) == 0
    assert calls[0] == ("create", "someone/tiny-mot", True)
    assert calls[1][0] == "upload" and {"README.md", "pipeline.json", "model.safetensors"} <= set(calls[1][2])
    assert "pushed to https://huggingface.co/someone/tiny-mot" in capsys.readouterr().out
    with pytest.raises(UserError, match="a hub id is ORG/NAME"):
        hub.push_to_hub(out, "not a repo id")
