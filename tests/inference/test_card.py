"""The model card an export writes: valid Hub metadata, and numbers that are the run's own."""


import yaml

from transfusion_mot.inference.card import LIBRARY
from transfusion_mot.inference.pipeline import Pipeline
from transfusion_mot.run_dir import RunDir


def front_matter(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def test_exported_card_has_hub_metadata_and_the_runs_numbers(tiny_run, tmp_path):
    run = RunDir(tiny_run)
    run.write_evaluation({"source": "test", "alignment demo: all_correct": 0.953, "FID (100 vs 100 val images)": 166.4,
                          "sampling": "50 steps, CFG 5.0 with guidance rescale 0.7, EMA weights"})
    try:
        pipe = Pipeline.from_run(tiny_run)
        out = pipe.save_pretrained(tmp_path / "model", repo_id="someone/tiny-mot")
    finally:
        run.evaluation_file.unlink()
    meta, body = front_matter((out / "README.md").read_text())
    assert meta["library_name"] == LIBRARY and meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "text-to-image" and "mixture-of-transformers" in meta["tags"]
    summary = run.read_summary()
    params = sum(p.numel() for p in pipe.model.parameters())
    assert summary["parameters"]["total"] == params
    assert f"| parameters | {params:,} |" in body or f"| parameters | {params} |" in body
    assert f"| steps | {summary['step']} |" in body and summary["step"] == 6
    tokens = summary["tokens_seen"]
    assert f"| tokens seen | {tokens:,} |" in body or f"| tokens seen | {tokens} |" in body
    assert "| alignment demo: all correct | 0.953 |" in body and "| FID (100 vs 100 val images) | 166.4 |" in body
    assert "sampled with 50 steps, CFG 5.0 with guidance rescale 0.7, EMA weights." in body
    assert 'Pipeline.from_pretrained("someone/tiny-mot")' in body
    # the facts travel with the export: re-saving the loaded pipeline writes the same card
    again = Pipeline.from_pretrained(out).save_pretrained(tmp_path / "again", repo_id="someone/tiny-mot")
    assert (again / "README.md").read_text() == (out / "README.md").read_text()


def test_the_cards_python_snippet_runs_on_the_export(tiny_run, tmp_path):
    out = Pipeline.from_run(tiny_run).save_pretrained(tmp_path / "model")
    _, body = front_matter((out / "README.md").read_text())
    snippet = body.split("```python\n", 1)[1].split("```", 1)[0].replace("THIS_DIRECTORY", str(out))
    snippet = snippet.replace("num_steps=50", "num_steps=2")  # the same calls, fewer steps
    scope: dict = {}
    exec(snippet, scope)  # noqa: S102 - the card's own instructions
    assert len(scope["images"]) == 1 and isinstance(scope["captions"][0], str)
