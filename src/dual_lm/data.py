"""Token shards -> packed training rows with document ids, repetitions, rank splits and exact resume.

Packing follows the reference trainer (DESIGN.md section 3): every document gets ``<s>``
prepended, documents are concatenated in a shuffled order and cut into rows of L+1 tokens;
input = row[:-1], target = row[1:], and a document id per input token (numbered from 0 inside
each row). Targets never reach into another document except the ``<s>`` that opens the next one,
which the last token of a document predicts (the reference's end-of-document signal).

Each epoch visits the kept documents in a fresh pseudo-random order (a keyed Feistel
permutation, so no per-document array is held) and re-packs them; the tail of an epoch that
does not fill a whole row is dropped. With repetitions R only the first 1/R of the training
tokens is kept (the last kept document is cut), and the run sees it R times in a fixed budget.

The loader's state is (epoch, position in the epoch's order, offset inside that document):
restoring it reproduces the following batches exactly, and memory does not grow with the corpus.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dual_lm.config import BOS_ID
from dual_lm.errors import UserError

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


# ------------------------------------------------------------------------------ permutation


def _mix(x: np.ndarray, key: int) -> np.ndarray:
    """splitmix64 finaliser of x xor key: a fast, well-spread 64-bit hash."""
    with np.errstate(over="ignore"):
        z = (x ^ np.uint64(key)) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def feistel_permutation(index: np.ndarray, n: int, key: int, rounds: int = 4) -> np.ndarray:
    """A keyed bijection of [0, n) evaluated at ``index`` without materialising the permutation.

    A balanced Feistel network on the smallest even bit width covering n, with cycle walking
    to stay inside [0, n) (Black & Rogaway, "Ciphers with arbitrary finite domains", 2002).
    """
    if n <= 1:
        return np.zeros_like(np.asarray(index, dtype=np.int64))
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    low = np.uint64((1 << half) - 1)
    keys = [
        int(_mix(np.array([(key * 16 + r) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64), 0x5EED)[0]) for r in range(rounds)
    ]

    def encrypt(x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(half), x & low
        for k in keys:
            left, right = right, left ^ (_mix(right, k) & low)
        return (left << np.uint64(half)) | right

    x = encrypt(np.asarray(index, dtype=np.uint64))
    outside = x >= np.uint64(n)
    while outside.any():
        x[outside] = encrypt(x[outside])
        outside = x >= np.uint64(n)
    return x.astype(np.int64)


# ------------------------------------------------------------------------------ token shards


class TokenShards:
    """Read-only, memory-mapped view of one split of a ``prepare-data`` folder."""

    def __init__(self, folder: str | Path, split: str = "train"):
        self.folder = Path(folder)
        manifest_path = self.folder / "manifest.json"
        if not manifest_path.is_file():
            raise UserError(f"{self.folder} has no manifest.json; run `dual-lm prepare-data` (again) to finish it")
        self.manifest = json.loads(manifest_path.read_text())
        metas = self.manifest["shards"] if split == "train" else [self.manifest["valid"]]
        self.tokens = [self._tokens(m) for m in metas]
        self.offsets = [np.load(self.folder / f"{m['name']}.docs.npy", mmap_mode="r") for m in metas]
        counts = np.array([len(o) - 1 for o in self.offsets], dtype=np.int64)
        self.doc_starts = np.concatenate([[0], np.cumsum(counts)])  # [shards + 1]
        sizes = np.array([o[-1] for o in self.offsets], dtype=np.int64)
        self.token_starts = np.concatenate([[0], np.cumsum(sizes)])

    def _tokens(self, meta: dict) -> np.ndarray:
        path = self.folder / f"{meta['name']}.tokens"
        if meta["tokens"] == 0:
            return np.zeros(0, dtype=meta["dtype"])
        return np.memmap(path, dtype=meta["dtype"], mode="r")

    @property
    def num_documents(self) -> int:
        return int(self.doc_starts[-1])

    @property
    def num_tokens(self) -> int:
        return int(self.token_starts[-1])

    def _locate(self, doc: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self.doc_starts, doc, side="right")) - 1
        return shard, doc - int(self.doc_starts[shard])

    def document(self, doc: int) -> np.ndarray:
        """The token ids of document ``doc`` (global index), without ``<s>``."""
        shard, local = self._locate(doc)
        offsets = self.offsets[shard]
        return self.tokens[shard][int(offsets[local]) : int(offsets[local + 1])]

    def tokens_before(self, doc: int) -> int:
        """Number of tokens in documents [0, doc)."""
        if doc >= self.num_documents:
            return self.num_tokens
        shard, local = self._locate(doc)
        return int(self.token_starts[shard] + self.offsets[shard][local])

    def keep_first(self, budget: int) -> tuple[int, int]:
        """(documents, tokens of the last one) that hold exactly the first ``budget`` tokens."""
        lo, hi = 0, self.num_documents  # smallest n with tokens_before(n) >= budget
        while lo < hi:
            mid = (lo + hi) // 2
            if self.tokens_before(mid) >= budget:
                hi = mid
            else:
                lo = mid + 1
        last = budget - self.tokens_before(lo - 1) if lo > 0 else 0
        return lo, last


# ------------------------------------------------------------------------------ packing loader


@dataclass
class Batch:
    """One rank's rows: inputs, targets and document ids are [B, L] int64."""

    inputs: torch.Tensor
    targets: torch.Tensor
    document_ids: torch.Tensor
    epoch: int


@dataclass
class LoaderState:
    epoch: int = 0
    position: int = 0  # index into the epoch's document order
    offset: int = 0  # tokens of that document (counting its <s>) already emitted
    seed: int = 0


class PackedLoader:
    """Infinite stream of packed batches; each call of ``next_batch`` advances the state by one global batch."""

    def __init__(
        self,
        shards: TokenShards,
        seq_len: int,
        rows_per_rank: int,
        repetitions: int = 1,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        bos_id: int = BOS_ID,
    ):
        if repetitions < 1:
            raise UserError(f"repetitions must be >= 1, got {repetitions}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} outside world size {world_size}")
        self.shards, self.seq_len, self.rows = shards, seq_len, rows_per_rank
        self.rank, self.world_size, self.bos_id = rank, world_size, bos_id
        self.repetitions = repetitions
        budget = shards.num_tokens // repetitions
        self.num_docs, self.last_doc_tokens = shards.keep_first(budget)
        self.kept_tokens = budget
        if self.kept_tokens + self.num_docs < seq_len + 1:
            raise UserError(
                f"the kept data ({self.kept_tokens} tokens after 1/{repetitions} of the corpus) "
                f"cannot fill one row of {seq_len + 1} tokens"
            )
        self.state = LoaderState(seed=seed)
        self._order_cache: tuple[int, int, np.ndarray] | None = None

    # -- state
    def state_dict(self) -> dict:
        return dict(vars(self.state))

    def load_state_dict(self, state: dict) -> None:
        self.state = LoaderState(**state)

    @property
    def rows_per_epoch(self) -> int:
        """Rows one epoch yields over all ranks (its tail is dropped)."""
        return (self.kept_tokens + self.num_docs) // (self.seq_len + 1)

    # -- documents in epoch order
    def _doc_at(self, epoch: int, position: int) -> np.ndarray:
        block = position // 1024
        key = self.state.seed * 1_000_003 + epoch
        if self._order_cache is None or self._order_cache[:2] != (key, block):
            index = np.arange(block * 1024, min((block + 1) * 1024, self.num_docs))
            self._order_cache = (key, block, feistel_permutation(index, self.num_docs, key))
        doc = int(self._order_cache[2][position - block * 1024])
        tokens = self.shards.document(doc)
        if doc == self.num_docs - 1 and self.last_doc_tokens:
            tokens = tokens[: self.last_doc_tokens]
        return tokens

    def _row(self) -> tuple[np.ndarray, np.ndarray]:
        """The next row of L+1 tokens and the local document id of each token."""
        need = self.seq_len + 1
        pieces, ids = [], []
        have, local = 0, 0
        st = self.state
        while have < need:
            if st.position == self.num_docs:  # epoch end: drop the partial row, start the next epoch
                st.epoch, st.position, st.offset = st.epoch + 1, 0, 0
                pieces, ids, have, local = [], [], 0, 0
                continue
            doc = self._doc_at(st.epoch, st.position)
            full = np.concatenate([np.array([self.bos_id], dtype=np.int64), doc.astype(np.int64)])
            take = full[st.offset : st.offset + need - have]
            pieces.append(take)
            ids.append(np.full(take.size, local, dtype=np.int64))
            have += take.size
            st.offset += take.size
            if st.offset == full.size:
                st.position, st.offset = st.position + 1, 0
                local += 1
        return np.concatenate(pieces), np.concatenate(ids)

    def next_batch(self) -> Batch:
        """This rank's rows of the next global batch (rank r takes rows [r*B, (r+1)*B))."""
        epoch = self.state.epoch
        rows, docs = [], []
        for index in range(self.rows * self.world_size):
            row, ids = self._row()
            if index // self.rows == self.rank:
                rows.append(row)
                docs.append(ids)
        tokens = torch.from_numpy(np.stack(rows))
        doc_ids = torch.from_numpy(np.stack(docs))
        return Batch(tokens[:, :-1], tokens[:, 1:], doc_ids[:, :-1], epoch)

    def __iter__(self):
        while True:
            yield self.next_batch()
