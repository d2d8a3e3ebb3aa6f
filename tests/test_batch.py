"""The collator: layout, targets, positions, packing, and patchify round trip."""

import pytest
import torch
from helpers import random_samples, tiny_config

from transfusion_mot.batch import IGNORE_INDEX, Collator, Sample, SpecialTokens, patchify, unpatchify


def test_patchify_round_trip_and_order():
    latent = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(2, 4, 6)
    patches = patchify(latent, 2)
    assert patches.shape == (6, 8)
    # first patch: channel 0 rows 0-1 cols 0-1, then channel 1
    assert patches[0].tolist() == [0, 1, 6, 7, 24, 25, 30, 31]
    # second patch is to the right of the first (row-major grid)
    assert patches[1, 0].item() == 2
    assert torch.equal(unpatchify(patches, 2, 4, 6, 2), latent)


def test_padded_layout_and_targets():
    cfg = tiny_config()
    sp = SpecialTokens.at_end_of_vocab(cfg.vocab_size)
    image = torch.randn(4, 4, 4)
    b = Collator(cfg).collate_padded([Sample([[1, 2], image, [3]]), Sample([[5]])])
    row = b.inputs.tokens[0].tolist()
    n = 4  # 4x4 latent, 2x2 patches
    assert row == [sp.bos, 1, 2, sp.boi] + [sp.pad] * n + [sp.eoi, 3, sp.eos]
    assert b.inputs.modality[0].tolist() == [0, 0, 0, 0] + [1] * n + [0, 0, 0]
    assert b.inputs.image_ids[0].tolist() == [-1] * 4 + [0] * n + [-1] * 3
    # LM targets: BOS->1, 1->2, 2->BOI, (BOI->patch: none), patches: none, EOI->3, 3->EOS, EOS: none
    assert b.text_targets[0].tolist() == [1, 2, sp.boi, IGNORE_INDEX] + [IGNORE_INDEX] * n + [3, sp.eos, IGNORE_INDEX]
    # second row padded, padding is document -1
    assert b.inputs.tokens[1].tolist()[:3] == [sp.bos, 5, sp.eos]
    assert b.inputs.doc_ids[1].tolist() == [0, 0, 0] + [-1] * (len(row) - 3)
    assert (b.text_targets[1, 3:] == IGNORE_INDEX).all()
    assert torch.equal(b.inputs.patches, patchify(image, 2))
    assert b.inputs.patch_coords.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert b.image_first.tolist() == [False]


def test_packed_rows_restart_positions_and_respect_budget():
    cfg = tiny_config()
    samples = random_samples(cfg, n=6)
    col = Collator(cfg)
    lengths = [col.collate_padded([s]).inputs.tokens.shape[1] for s in samples]
    b = col.collate_packed(samples, token_budget=70)
    assert b.inputs.tokens.shape[1] == 70
    total = 0
    for r in range(b.inputs.tokens.shape[0]):
        docs = b.inputs.doc_ids[r]
        for d in docs.unique().tolist():
            if d < 0:
                continue
            idx = (docs == d).nonzero().flatten()
            assert torch.equal(b.inputs.positions[r, idx], torch.arange(len(idx)))
            assert idx.max() - idx.min() + 1 == len(idx)  # contiguous
            total += len(idx)
    assert total == sum(lengths)
    # every sample's patches are present, in order, with a unique image id per image
    assert b.inputs.patches.shape[0] == sum(col.collate_padded([s]).inputs.patches.shape[0] for s in samples)
    assert b.num_images == 6
    assert len(set(b.inputs.image_ids[b.inputs.image_ids >= 0].tolist())) == 6


def test_image_first_detection():
    cfg = tiny_config()
    img = torch.randn(4, 4, 4)
    assert Sample([img, [1]]).is_image_first()
    assert Sample([[], img, [1]]).is_image_first()
    assert not Sample([[1], img]).is_image_first()
    assert Sample([[1], img], image_first=True).is_image_first()
    b = Collator(cfg).collate_padded([Sample([img, [1]]), Sample([[2], img])])
    assert b.image_first.tolist() == [True, False]


def test_packing_errors():
    cfg = tiny_config()
    col = Collator(cfg)
    with pytest.raises(ValueError, match="packing budget"):
        col.collate_packed([Sample([list(range(30))])], token_budget=20)
    with pytest.raises(ValueError, match="empty"):
        col.collate_packed([])
    with pytest.raises(ValueError, match="exceeds"):
        Collator(cfg, max_len=cfg.max_seq_len + 1)
