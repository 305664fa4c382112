"""The reference packing, bit for bit (fixture packing.json), the row shuffle, and one epoch over a prepared corpus."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from conftest import REFERENCE
from dual_lm.data.loader import PackedLoader, TokenShards, feistel_permutation, pack_documents, packed_row
from dual_lm.tokens import BOS_ID


@pytest.fixture(scope="module")
def packing():
    return json.loads((REFERENCE / "packing.json").read_text())


class ListShards:
    """The few TokenShards members the loader reads, over token lists held in memory."""

    def __init__(self, documents):
        self.docs = [np.asarray(d, dtype=np.uint16) for d in documents]
        self.offsets = [np.concatenate([[0], np.cumsum([len(d) for d in self.docs])]).astype(np.int64)]
        self.num_documents, self.num_tokens = len(self.docs), int(self.offsets[0][-1])

    def document(self, doc):
        return self.docs[doc]

    def keep_first(self, budget):
        ends = self.offsets[0][1:]
        count = int(np.searchsorted(ends, budget, side="left")) + 1 if budget else 0
        return count, (budget - int(self.offsets[0][count - 1]) if count else 0)


def loader_rows(loader, batches):
    out = [loader.next_batch() for _ in range(batches)]
    return [torch.cat([getattr(b, k) for b in out]).tolist() for k in ("inputs", "targets", "document_ids")]


# ------------------------------------------------------------------------------ the fixture, exactly


@pytest.mark.parametrize("case", range(3))
def test_pure_packing_reproduces_the_reference_fixture(packing, case):
    want = packing["cases"][case]
    rows = pack_documents(packing["documents"], want["seq_len"], packing["bos_id"])
    assert rows.inputs.tolist() == want["inputs"]
    assert rows.targets.tolist() == want["targets"]
    assert rows.document_ids.tolist() == want["document_ids"]
    assert rows.inputs.dtype == rows.targets.dtype == rows.document_ids.dtype == np.int64


@pytest.mark.parametrize("case", range(3))
@pytest.mark.parametrize(("rows_per_rank", "world_size"), [(1, 1), (2, 2), (3, 1)])
def test_loader_without_shuffles_reproduces_the_fixture_on_every_world_size(packing, case, rows_per_rank, world_size):
    want = packing["cases"][case]
    shards = ListShards(packing["documents"])
    total = len(want["inputs"])
    got = [[], [], []]
    for rank in range(world_size):
        loader = PackedLoader(shards, want["seq_len"], rows_per_rank, rank=rank, world_size=world_size, shuffle=False)
        assert loader.rows_per_epoch == total
        steps = -(-total // (rows_per_rank * world_size))
        for part, rows in zip(got, loader_rows(loader, steps), strict=True):
            part.append(rows)
    # global row g sits on rank (g // B) % W, in that rank's step g // (B W)
    for key, part in zip(("inputs", "targets", "document_ids"), got, strict=True):
        interleaved = []
        for step in range(len(part[0]) // rows_per_rank):
            for rank in range(world_size):
                interleaved += part[rank][step * rows_per_rank : (step + 1) * rows_per_rank]
        assert interleaved[:total] == want[key], key
        assert interleaved[total:] == want[key][: len(interleaved) - total]  # epoch 1 starts over, tail dropped


def test_fixture_shows_the_rule(packing):
    """The facts the fixture pins: <s> never a target, no cross-document pair, ids reset per row, tail dropped."""
    docs = packing["documents"]
    pairs = sum(len(d) for d in docs)
    for case in packing["cases"]:
        inputs, targets = np.array(case["inputs"]), np.array(case["targets"])
        assert not (targets == BOS_ID).any()
        assert len(inputs) == pairs // case["seq_len"]
        assert (inputs == BOS_ID).sum() == sum(
            1 for e in np.cumsum([len(d) for d in docs]) - [len(d) for d in docs] if e < len(inputs) * case["seq_len"]
        )


# ------------------------------------------------------------------------------ the pure function's edges


def test_long_document_continues_with_id_zero_and_exact_boundary_counts_from_one():
    docs = [[20, 21, 22, 23, 24, 25], [30, 31], [40], [50, 51, 52]]
    rows = pack_documents(docs, 4)
    assert rows.inputs.tolist() == [[1, 20, 21, 22], [23, 24, 1, 30], [1, 1, 50, 51]]
    assert rows.targets.tolist() == [[20, 21, 22, 23], [24, 25, 30, 31], [40, 50, 51, 52]]
    assert rows.document_ids.tolist() == [[0, 0, 0, 0], [0, 0, 1, 1], [1, 2, 2, 2]]


def test_empty_documents_count_as_documents_like_the_reference():
    rows = pack_documents([[], [20, 21], [], [30, 31, 32], [40, 41, 42]], 4)
    assert rows.inputs.tolist() == [[1, 20, 1, 30], [31, 1, 40, 41]]
    assert rows.document_ids.tolist() == [[1, 1, 3, 3], [0, 1, 1, 1]]  # the empty ones took ids 0 and 2


def test_tail_is_dropped_and_a_short_corpus_gives_no_row():
    assert pack_documents([[20, 21, 22]], 4).inputs.shape == (0, 4)
    assert pack_documents([[20, 21, 22], [30, 31]], 4).targets.tolist() == [[20, 21, 22, 30]]
    assert pack_documents([], 4).inputs.shape == (0, 4)
    with pytest.raises(ValueError, match="seq_len must be >= 1"):
        pack_documents([[20]], 0)


def test_packed_row_refuses_rows_outside_the_packing():
    ends = np.cumsum([3, 2])
    with pytest.raises(ValueError, match="outside the packing"):
        packed_row(1, ends, lambda a, b: [np.arange(3), np.arange(2)][a:b], 4)


# ------------------------------------------------------------------------------ one epoch over a prepared corpus


def epoch_walk(loader):
    """Exactly one epoch of single rows: (inputs, targets, document ids) each [rows, L]."""
    batches = [loader.next_batch() for _ in range(loader.rows_per_epoch)]
    assert (loader.state.epoch, loader.state.position) == (1, 0)
    return [torch.cat([getattr(b, k) for b in batches]).numpy() for k in ("inputs", "targets", "document_ids")]


def pairs_of(shards, order, limit):
    """The first ``limit`` per-document pairs in document order ``order``, computed here independently."""
    out = []
    for doc in order:
        tokens = shards.document(int(doc)).tolist()
        out += list(zip([BOS_ID, *tokens[:-1]], tokens, strict=True))
    return out[:limit]


def test_one_epoch_over_a_prepared_corpus(data_dir):
    shards = TokenShards(data_dir)
    seq_len = 32
    loader = PackedLoader(shards, seq_len, 1, seed=5)
    inputs, targets, ids = epoch_walk(loader)
    rows = loader.rows_per_epoch
    assert rows == shards.num_tokens // seq_len and inputs.shape == (rows, seq_len)
    assert not (targets == BOS_ID).any()  # <s> is never a target
    # only per-document pairs, and every pair of the epoch except the dropped tail (as a multiset)
    order = loader.document_order(0)
    assert sorted(order.tolist()) == list(range(shards.num_documents))
    expected = pairs_of(shards, order, rows * seq_len)
    assert Counter(zip(inputs.ravel().tolist(), targets.ravel().tolist(), strict=True)) == Counter(expected)
    assert shards.num_tokens - rows * seq_len < seq_len  # the tail dropped is less than one row
    # inside a row a document's pairs chain (input j+1 = target j); a new id starts exactly at <s>
    same = ids[:, 1:] == ids[:, :-1]
    assert (inputs[:, 1:][same] == targets[:, :-1][same]).all()
    assert ((inputs[:, 1:] == BOS_ID) == ~same).all()
    # the rows are the packing's rows in a shuffled order: adjacent emitted rows rarely continue each other
    plain = pack_documents([shards.document(int(d)) for d in order], seq_len)  # the epoch's rows, packing order
    packed = {tuple(r): k for k, r in enumerate(np.concatenate([plain.inputs, plain.targets], 1).tolist())}
    assert len(packed) == rows  # rows are distinct, so each emitted row names its packing index
    index = [packed[tuple(r)] for r in np.concatenate([inputs, targets], 1).tolist()]
    assert sorted(index) == list(range(rows))  # each packing row once
    consecutive = np.mean(np.diff(index) == 1)
    assert consecutive < 0.05, consecutive
    continued = np.mean((ids[:, 0] == 0) & (inputs[:, 0] != BOS_ID))
    assert continued > 0.3  # many rows start inside a document, yet their predecessor in the stream is elsewhere


def test_epochs_reshuffle_documents_and_rows(data_dir):
    loader = PackedLoader(TokenShards(data_dir), 32, 1, seed=5)
    assert not np.array_equal(loader.document_order(0), loader.document_order(1))
    positions = np.arange(loader.rows_per_epoch)
    first, second = loader.row_order(0, positions), loader.row_order(1, positions)
    assert sorted(first.tolist()) == sorted(second.tolist()) == positions.tolist()
    assert not np.array_equal(first, second) and not np.array_equal(first, positions)


def test_row_shuffle_is_uniform():
    """Where row 0 lands over many keys: every position equally often (chi-square, 9 degrees of freedom)."""
    n, keys = 10, 5000
    landing = [int(np.flatnonzero(feistel_permutation(np.arange(n), n, key) == 0)[0]) for key in range(keys)]
    counts = np.bincount(landing, minlength=n)
    chi2 = ((counts - keys / n) ** 2 / (keys / n)).sum()
    assert chi2 < 27.9, counts  # p = 0.001


def test_resume_anywhere_and_every_world_size_see_the_same_rows(data_dir):
    shards = TokenShards(data_dir)
    whole = PackedLoader(shards, 16, 6, repetitions=2, seed=3)
    steps = 2 * whole.rows_per_epoch // 6 + 3  # past two epoch ends, with batches straddling them
    want = [whole.next_batch() for _ in range(steps)]
    for world in (2, 3):
        parts = [
            PackedLoader(shards, 16, 6 // world, repetitions=2, seed=3, rank=r, world_size=world) for r in range(world)
        ]
        for batch in want:
            got = [p.next_batch() for p in parts]
            assert torch.equal(torch.cat([g.inputs for g in got]), batch.inputs)
            assert torch.equal(torch.cat([g.document_ids for g in got]), batch.document_ids)
    for cut in (1, steps // 2, steps - 2):
        first = PackedLoader(shards, 16, 6, repetitions=2, seed=3)
        for _ in range(cut):
            first.next_batch()
        state = json.loads(json.dumps(first.state_dict()))
        again = PackedLoader(shards, 16, 6, repetitions=2, seed=3)
        again.load_state_dict(state)
        for batch in want[cut:]:
            got = again.next_batch()
            assert torch.equal(got.inputs, batch.inputs) and torch.equal(got.targets, batch.targets)


def test_memory_is_per_document_not_per_token(data_dir):
    shards = TokenShards(data_dir)
    loader = PackedLoader(shards, 8, 4, seed=1)
    for _ in range(loader.rows_per_epoch // 4 + 2):
        loader.next_batch()
    held = sum(v.nbytes for v in vars(loader).values() if isinstance(v, np.ndarray))
    held += loader._layout[1].nbytes
    assert held == 16 * shards.num_documents  # lengths + cumulative lengths, one int64 each
    assert held < shards.num_tokens * 8  # below one int64 per token (a materialised epoch would be 3x that)


def test_old_loader_state_is_refused_with_one_clear_error(data_dir):
    from dual_lm.errors import UserError

    loader = PackedLoader(TokenShards(data_dir), 16, 2)
    with pytest.raises(UserError, match="packing differs; start the run again"):
        loader.load_state_dict({"epoch": 0, "position": 3, "offset": 5, "seed": 0})
    with pytest.raises(UserError, match="does not fit this data"):
        loader.load_state_dict({"epoch": 0, "position": loader.rows_per_epoch, "seed": 0})
