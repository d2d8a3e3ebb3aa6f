"""The offline English corpus: WordNet's glosses parsed from its data files (a small hand-written one here,
Debian's real one where installed), split by a hash of the text, written with counts and checksums."""

import json
from pathlib import Path

import pytest

from transfusion_mot.cli import main
from transfusion_mot.common.errors import InputNotFound
from transfusion_mot.common.files import file_sha256
from transfusion_mot.data.corpus import WORDNET_DIR, build_corpus, in_validation, wordnet_glosses

HEADER = "  1 This software and database is being provided to you, the LICENSEE, by  \n  2 Princeton University | x\n"


def fake_wordnet(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = {"data.noun": ["00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived or known  ",
                           "00002137 03 n 02 ball 0 001 @ 00001740 n 0000 | a round object   that is hit in games  "],
             "data.verb": ["00001740 29 v 04 breathe 0 | draw air into, and expel out of, the lungs  "],
             "data.adj": ["00001740 00 a 01 red 0 | of the colour of blood  "],
             "data.adv": ["00001837 02 r 01 again 0 | a round object that is hit in games"]}  # a duplicate
    for name, rows in lines.items():
        (root / name).write_text(HEADER + "\n".join(rows) + "\n")
    return root


def test_glosses_are_parsed_normalised_and_deduplicated(tmp_path):
    assert wordnet_glosses(fake_wordnet(tmp_path)) == [
        "that which is perceived or known", "a round object that is hit in games",
        "draw air into, and expel out of, the lungs", "of the colour of blood"]
    with pytest.raises(InputNotFound, match="apt-get install wordnet-base"):
        wordnet_glosses(tmp_path / "missing")


def test_the_split_is_by_text_and_the_files_are_complete(tmp_path):
    root = fake_wordnet(tmp_path / "wn")
    info = build_corpus(tmp_path / "c", val_fraction=0.5, wordnet_dir=root)
    train = (tmp_path / "c" / "train.txt").read_text().splitlines()
    val = (tmp_path / "c" / "val.txt").read_text().splitlines()
    assert sorted(train + val) == sorted(wordnet_glosses(root))
    assert all(in_validation(d, 0.5) for d in val) and not any(in_validation(d, 0.5) for d in train)
    assert info["files"]["val.txt"] == {"documents": len(val), "characters": sum(map(len, val)),
                                        "sha256": file_sha256(tmp_path / "c" / "val.txt")}
    assert json.loads((tmp_path / "c" / "info.json").read_text()) == info
    # the split of a document does not depend on what else is in the corpus
    assert in_validation("of the colour of blood", 0.5) == ("of the colour of blood" in val)


@pytest.mark.skipif(not Path(WORDNET_DIR, "data.noun").is_file(), reason="needs Debian's wordnet-base")
def test_the_real_wordnet_through_the_command_line(tmp_path, capsys):
    assert main(["data", "corpus", "--out", str(tmp_path / "c")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["documents"] > 100_000 and 0.015 < info["files"]["val.txt"]["documents"] / info["documents"] < 0.025
    assert main(["data", "corpus", "--out", str(tmp_path / "d"), "--wordnet-dir", str(tmp_path / "none")]) != 0
    assert "wordnet-base" in capsys.readouterr().err
