"""(d) The Transfusion mask: semantics on a packed, padded batch; SDPA and FlexAttention agree."""

import pytest
import torch
from helpers import random_samples, tiny_config

from transfusion_mot.batch import Collator
from transfusion_mot.masks import dense_mask, flex_available, transfusion_mask_mod


@pytest.fixture
def packed_batch():
    cfg = tiny_config()
    # three documents of mixed layout in one row plus padding, and a second row
    return Collator(cfg).collate_packed(random_samples(cfg, n=5), token_budget=90)


def test_mask_semantics(packed_batch):
    b = packed_batch
    B, L = b.inputs.tokens.shape
    assert (b.inputs.doc_ids.max(dim=1).values >= 1).any(), "the fixture must pack several documents into a row"
    assert (b.inputs.doc_ids == -1).any(), "the fixture must contain padding"
    mask = dense_mask(transfusion_mask_mod(b.inputs.doc_ids, b.inputs.image_ids), B, L, L, torch.device("cpu"))[:, 0]
    for r in range(B):
        doc, img, m = b.inputs.doc_ids[r], b.inputs.image_ids[r], mask[r]
        for q in range(L):
            later = torch.arange(L) > q
            if doc[q] < 0:  # padding sees only itself
                assert m[q].nonzero().flatten().tolist() == [q]
                continue
            # padding is never seen by a real token
            assert not m[q][doc < 0].any()
            # other documents are never seen
            assert not m[q][(doc != doc[q])].any()
            if img[q] < 0:  # text: causal, sees every earlier token of its document
                assert not m[q][later].any()
                assert m[q][(~later) & (doc == doc[q])].all()
            else:  # image patch: all of its image, all before it, nothing after the image
                same = img == img[q]
                assert m[q][same].all()
                last = same.nonzero().max()
                assert not m[q][torch.arange(L) > last].any()
                assert m[q][(torch.arange(L) <= last) & (doc == doc[q])].all()


def test_image_tokens_are_bidirectional_text_is_not(packed_batch):
    b = packed_batch
    B, L = b.inputs.tokens.shape
    mask = dense_mask(transfusion_mask_mod(b.inputs.doc_ids, b.inputs.image_ids), B, L, L, torch.device("cpu"))[:, 0]
    first_patch = (b.inputs.image_ids[0] >= 0).nonzero()[0].item()
    assert mask[0, first_patch, first_patch + 1]  # a patch sees the next patch of its image
    assert not mask[0, first_patch - 1, first_patch]  # BOI does not see the first patch


@pytest.mark.skipif(not flex_available(), reason="torch without FlexAttention")
def test_dense_mask_equals_flex_materialised_mask(packed_batch):
    from torch.nn.attention.flex_attention import create_block_mask, create_mask

    b = packed_batch
    B, L = b.inputs.tokens.shape
    mod = transfusion_mask_mod(b.inputs.doc_ids, b.inputs.image_ids)
    ours = dense_mask(mod, B, L, L, torch.device("cpu"))
    flex = create_mask(mod, B, 1, L, L, device="cpu")
    assert ours.shape == flex.shape
    assert torch.equal(ours, flex)
    # the BlockMask built from the same function keeps every block that holds an allowed pair
    block = create_block_mask(mod, B, None, L, L, device="cpu", BLOCK_SIZE=16)
    blocks = block.to_dense()[:, 0].bool()  # (B, Qblocks, KVblocks)
    padded = torch.zeros(B, blocks.shape[1] * 16, blocks.shape[2] * 16, dtype=torch.bool)
    padded[:, :L, :L] = ours[:, 0]
    any_allowed = padded.view(B, blocks.shape[1], 16, blocks.shape[2], 16).any(dim=(2, 4))
    assert torch.equal(blocks, any_allowed)


def test_kv_offset_mask_is_a_slice_of_the_full_mask(packed_batch):
    b = packed_batch
    B, L = b.inputs.tokens.shape
    full = dense_mask(transfusion_mask_mod(b.inputs.doc_ids, b.inputs.image_ids), B, L, L, torch.device("cpu"))
    off = 17
    tail = dense_mask(transfusion_mask_mod(b.inputs.doc_ids, b.inputs.image_ids, q_offset=off), B, L - off, L, torch.device("cpu"))
    assert torch.equal(tail, full[:, :, off:])

