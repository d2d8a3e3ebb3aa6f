"""The training sample stream: Transfusion's direction mix (80/20 caption-first / image-first), caption
dropout for classifier-free guidance, the text-only stream, per-rank draws, and exact resumption."""

import pytest
import torch

from transfusion_mot.common.errors import InvalidInput
from transfusion_mot.data.streams import ShuffledStream
from transfusion_mot.tokenizer import ByteTokenizer
from transfusion_mot.training.stream import ImagePairSource, TrainingStream

N = 40


def pairs():
    g = torch.Generator().manual_seed(0)
    return [{"latent": torch.randn(4, 2, 2, generator=g), "text": f"caption {i}"} for i in range(N)]


def stream(seed=0, rank=0, text_docs=None, **kwargs):
    source = ImagePairSource(ShuffledStream(pairs(), seed=seed, rank=0, world_size=1))
    text = ShuffledStream(text_docs, seed=seed + 1) if text_docs else None
    return TrainingStream(source, ByteTokenizer(), seed=seed, rank=rank, text_stream=text, **kwargs)


def kind(sample) -> str:
    segments = sample.segments
    if len(segments) == 1:
        return "caption_dropped" if isinstance(segments[0], torch.Tensor) else "text_only"
    return "image_first" if sample.image_first else "caption_first"


def test_directions_and_dropout_follow_the_recipe():
    s = stream(image_first_ratio=0.2, caption_dropout=0.1)
    samples = s.next_samples(4000)
    counts = {k: sum(kind(x) == k for x in samples) for k in ("caption_first", "caption_dropped", "image_first")}
    assert counts == {k: s.counts[k] for k in counts} and s.counts["text_only"] == 0
    # binomial: 4000 draws, image-first p = 0.2 (sd 25), dropout p = 0.8 * 0.1 = 0.08 (sd 17)
    assert abs(counts["image_first"] - 800) < 100 and abs(counts["caption_dropped"] - 320) < 70
    for sample in samples[:200]:
        k = kind(sample)
        if k == "image_first":  # the image, then its caption: the captioning direction (t capped later)
            assert isinstance(sample.segments[0], torch.Tensor) and sample.is_image_first()
        elif k == "caption_first":
            assert bytes(sample.segments[0]).decode().startswith("caption ") and not sample.is_image_first()
            assert isinstance(sample.segments[1], torch.Tensor)
        elif k == "caption_dropped":  # the empty caption: what guidance samples unconditionally
            assert not sample.is_image_first()


def test_every_pair_is_seen_once_per_epoch_in_caption_order():
    s = stream(image_first_ratio=0.0, caption_dropout=0.0)
    texts = [bytes(x.segments[0]).decode() for x in s.next_samples(N)]
    assert sorted(texts) == sorted(f"caption {i}" for i in range(N))


def test_zero_ratios_and_text_only_documents():
    s = stream(image_first_ratio=0.0, caption_dropout=0.0)
    assert all(kind(x) == "caption_first" for x in s.next_samples(100))
    docs = ["a document about nothing", "another one that is longer than the limit"]
    t = stream(text_docs=docs, text_only_ratio=0.5, max_doc_tokens=10)
    samples = t.next_samples(400)
    text_only = [x for x in samples if kind(x) == "text_only"]
    assert abs(len(text_only) - 200) < 40 and all(len(x.segments[0]) <= 10 for x in text_only)
    assert {bytes(x.segments[0]).decode() for x in text_only} == {d[:10] for d in docs}
    # without a text stream the ratio has no effect
    assert stream(text_only_ratio=0.5).counts["text_only"] == 0


def test_ranks_draw_differently_and_seeds_repeat():
    first = [kind(x) for x in stream(rank=0).next_samples(200)]
    assert first == [kind(x) for x in stream(rank=0).next_samples(200)]
    assert first != [kind(x) for x in stream(rank=1).next_samples(200)]


def test_resume_continues_exactly():
    docs = ["x y z", "u v"]
    straight = stream(text_docs=docs, text_only_ratio=0.2)
    expected = straight.next_samples(30) + straight.next_samples(30)
    first = stream(text_docs=docs, text_only_ratio=0.2)
    head = first.next_samples(30)
    state = first.state_dict()
    resumed = stream(text_docs=docs, text_only_ratio=0.2)
    resumed.load_state_dict(state)
    got = head + resumed.next_samples(30)
    assert resumed.counts == straight.counts
    for a, b in zip(expected, got):
        assert kind(a) == kind(b) and len(a.segments) == len(b.segments)
        for x, y in zip(a.segments, b.segments):
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else list(x) == list(y)


def test_long_captions_follow_the_overflow_rule():
    with pytest.raises(InvalidInput, match="more than max_text_tokens=3"):
        stream(image_first_ratio=0.0, caption_dropout=0.0, max_text_tokens=3).next_samples(1)
    cut = stream(image_first_ratio=0.0, caption_dropout=0.0, max_text_tokens=3, overflow="truncate").next_samples(1)
    assert len(cut[0].segments[0]) == 3


def test_training_data_shares_text_documents_between_ranks(tmp_path, data):
    """Each process of a data-parallel run reads its own documents: over one pass of the corpus, the two
    ranks' text-only documents are disjoint and together cover every document once."""
    from helpers import make_config

    from transfusion_mot.common.distributed import DistInfo
    from transfusion_mot.training.stream import build_training_data

    corpus = tmp_path / "docs.txt"
    corpus.write_text("".join(f"document number {i}\n" for i in range(12)))
    config = make_config(data, data={"text_only_path": str(corpus), "text_only_ratio": 0.5})
    seen = []
    for rank in (0, 1):
        built = build_training_data(config, ByteTokenizer(), DistInfo(rank=rank, world_size=2), torch.device("cpu"))
        seen.append([next(built.mix.text_stream) for _ in range(6)])
    assert set(seen[0]).isdisjoint(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(f"document number {i}" for i in range(12))


def _packing_parts(draw=5):
    from helpers import tiny_config

    from transfusion_mot.batch import Collator
    from transfusion_mot.training.stream import PackedBatches

    config = tiny_config(max_seq_len=64, vocab_size=261)  # the byte tokenizer's ids
    return PackedBatches(stream(), Collator(config), rows=3, budget=64, draw=draw), Collator(config)


def test_packing_fills_batch_size_rows_to_the_budget_and_drops_nothing():
    """`batch_size` counts rows: every micro-batch has exactly that many rows of `token_budget` tokens, rows are
    filled first-fit until the next sample fits nowhere, and the samples come in stream order, none lost."""
    packed, collator = _packing_parts()
    reference = stream()  # the same stream, drawn one sample at a time
    expected = reference.next_samples(200)
    placed = []
    for _ in range(6):
        batch = next(packed)
        assert tuple(batch.inputs.tokens.shape) == (3, 64)
        lengths = [collator.layout_length(s) for s in expected[len(placed):len(placed) + 40]]
        n_docs = int((batch.inputs.doc_ids.max(dim=1).values + 1).sum())
        used = int((batch.inputs.doc_ids >= 0).sum())
        assert used == sum(lengths[:n_docs])
        # the first sample left over fits in no row: the rows are as full as first-fit makes them
        free = [64 - int((row >= 0).sum()) for row in batch.inputs.doc_ids]
        assert lengths[n_docs] > max(free)
        placed += expected[len(placed):len(placed) + n_docs]
    assert 1 - used / (3 * 64) < 0.25  # samples of ~15 tokens leave little padding in 64-token rows


def test_packed_batches_resume_exactly_with_the_unplaced_samples():
    packed, _ = _packing_parts(draw=7)
    next(packed)
    state = packed.state_dict()
    assert state["pending"]  # drawn but not yet placed
    following = [next(packed) for _ in range(3)]
    resumed, _ = _packing_parts(draw=7)
    resumed.load_state_dict(state)
    for a, b in zip(following, [next(resumed) for _ in range(3)]):
        assert torch.equal(a.inputs.tokens, b.inputs.tokens) and torch.equal(a.inputs.patches, b.inputs.patches)


def test_layout_length_counts_what_the_collator_lays_out():
    from helpers import tiny_config

    from transfusion_mot.batch import Collator, Sample

    collator = Collator(tiny_config(vocab_size=261))
    for sample in stream().next_samples(30) + [Sample([[1, 2], torch.zeros(4, 4, 6), [3]])]:
        assert collator.layout_length(sample) == len(collator._layout(sample)["tokens"])


