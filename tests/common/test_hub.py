"""Hub ids where a directory is expected: told apart from paths, downloaded through huggingface_hub (only the
files asked for), and one clear line offline."""

import pytest

from transfusion_mot.common.errors import InputNotFound
from transfusion_mot.common.hub import is_repo_id, local_snapshot


def test_ids_and_paths_are_told_apart(tmp_path, monkeypatch):
    assert is_repo_id("Qwen/Qwen2.5-0.5B") and is_repo_id("meta-llama/Llama-3.2-1B")
    assert not is_repo_id("runs/../x/y/z") and not is_repo_id("plain") and not is_repo_id(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert not is_repo_id("org/name")  # a directory of that name here wins


def test_a_local_directory_is_used_as_is_and_a_hub_id_downloads_only_what_is_asked(tmp_path, monkeypatch):
    assert local_snapshot(tmp_path, "anything") == tmp_path
    asked = []

    def fake(repo_id, revision=None, **kw):
        asked.append((repo_id, revision, kw))
        return str(tmp_path)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake)
    assert local_snapshot("org/model", "an LM", allow_patterns=["config.json"]) == tmp_path
    assert local_snapshot("org/model", "an LM", revision="v2") == tmp_path
    assert asked == [("org/model", None, {"allow_patterns": ["config.json"]}), ("org/model", "v2", {})]


def test_offline_is_one_line_naming_the_id():
    with pytest.raises(InputNotFound, match="nobody/not-cached: cannot get it from the Hugging Face Hub") as err:
        local_snapshot("nobody/not-cached", "a directory of a transformers causal LM")  # HF_HUB_OFFLINE=1 here
    assert "\n" not in str(err.value) and "transformers causal LM" in str(err.value)
