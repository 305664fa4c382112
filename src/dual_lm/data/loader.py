"""Token shards -> packed training rows with document ids, repetitions, row shuffle, rank splits and exact resume.

Packing is the reference trainer's (DESIGN.md section 3) and lives in one pure function,
``pack_documents`` (documents in a given order -> rows), whose row builder the loader uses:

- every document d = [d0 .. d(n-1)] is shifted **on its own** into n (input, target) pairs,
  inputs ``[<s>, d0 .. d(n-2)]``, targets ``[d0 .. d(n-1)]``: ``<s>`` is never a target, a
  document's last token is never an input and no pair crosses a document boundary;
- the pairs of all documents are concatenated and cut into rows of exactly L pairs (a document
  may continue into the next row; no ``</s>``, no padding); the incomplete tail is dropped, so an
  epoch has ``tokens // L`` rows whatever the order;
- a document id per position counts documents inside the row: the part of a document continued
  from the previous row has id 0, the documents starting in the row count on from there; as in
  the reference, a row that starts exactly at a document start (the previous row ended with a
  whole document) numbers its documents from 1, except the epoch's first row (from 0). Only
  equality of ids matters to attention; the numbering is kept for bit-for-bit parity.

Order of one epoch e (seed s): the kept documents are permuted by a keyed Feistel permutation
(key from s and e), packed in that order, and the epoch's rows are then emitted in the order of
a second keyed Feistel permutation of the row indices (a uniform shuffle of the rows; Black &
Rogaway's cycle-walking cipher, no per-row array). Row k of the packing is found by binary search
in the epoch's cumulative document lengths (one int64 per kept document, rebuilt when the epoch
changes), so memory is O(documents) and never grows with the number of tokens. The global row
stream is epoch 0's rows, then epoch 1's, ...; a batch may straddle two epochs. Rank r of W takes
rows [rB, (r+1)B) of every global batch of W x B rows, so every world size sees the same rows.

With repetitions R only the first 1/R of the training tokens is kept (the last kept document is
cut) and the run sees it R times in a fixed budget, re-shuffled and re-packed each epoch.

The loader's state is (epoch, rows of that epoch already emitted, seed): restoring it
reproduces the following batches exactly.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dual_lm.config import SEED_STRIDE
from dual_lm.data.prepare import check_format
from dual_lm.errors import UserError
from dual_lm.tokens import BOS_ID

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


_TOKEN_DTYPES = ("uint16", "uint32")


def _damaged(folder: Path, what: str) -> UserError:
    return UserError(
        f"data folder {folder}: {what}; it is damaged or incomplete: re-run `dual-lm prepare-data` with the same "
        "arguments to repair it"
    )


def _count(value, name: str, folder: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _damaged(folder, f"manifest.json gives {name} = {value!r}, not a count")
    return value


def read_manifest(folder: Path) -> dict:
    """``manifest.json`` of a prepare-data folder, checked for the keys and the format this code reads."""

    path = folder / "manifest.json"
    if not path.is_file():
        raise UserError(f"{folder} has no manifest.json; run `dual-lm prepare-data` (again) to finish it")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _damaged(folder, f"manifest.json is not valid JSON ({err})") from None
    if not isinstance(manifest, dict):
        raise _damaged(folder, "manifest.json does not hold a JSON object")
    missing = [k for k in ("format", "vocab_size", "dtype", "shards", "valid") if k not in manifest]
    if missing:
        raise _damaged(folder, f"manifest.json lacks {', '.join(missing)}")
    check_format(manifest, folder)  # the one check of the format: this version reads only its own
    if _count(manifest["vocab_size"], "vocab_size", folder) < 1:
        raise _damaged(folder, "manifest.json gives vocab_size = 0")
    if manifest["dtype"] not in _TOKEN_DTYPES:
        raise _damaged(folder, f"manifest.json gives dtype {manifest['dtype']!r}, not one of {_TOKEN_DTYPES}")
    if not isinstance(manifest["shards"], list) or not manifest["shards"] or not isinstance(manifest["valid"], dict):
        raise _damaged(folder, "manifest.json needs a non-empty list of shards and a valid entry")
    return manifest


def _plain_name(name, folder: Path) -> str:
    """A shard name is a plain file name inside the folder: never a path that reads elsewhere."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise _damaged(folder, f"manifest.json names a shard {name!r}, which is not a plain file name in the folder")
    return name


def check_shard(folder: Path, meta) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, document offsets) of one manifest entry, after checking that the files on disk are the
    ones the entry describes: the token file's byte size, and offsets 0 = o[0] <= ... <= o[-1] = tokens."""
    if not isinstance(meta, dict) or not {"name", "tokens", "documents", "dtype"} <= set(meta):
        raise _damaged(folder, f"manifest.json has a shard entry without name, tokens, documents and dtype: {meta!r}")
    name = _plain_name(meta["name"], folder)
    tokens = _count(meta["tokens"], f"{name} tokens", folder)
    documents = _count(meta["documents"], f"{name} documents", folder)
    if meta["dtype"] not in _TOKEN_DTYPES:
        raise _damaged(folder, f"manifest.json gives {name} dtype {meta['dtype']!r}, not one of {_TOKEN_DTYPES}")
    dtype = np.dtype(meta["dtype"])
    path = folder / f"{name}.tokens"
    if not path.is_file():
        raise _damaged(folder, f"{path.name} is missing")
    size, want = path.stat().st_size, tokens * dtype.itemsize
    if size != want:
        says = f"manifest.json says {tokens} {dtype} tokens ({want} bytes)"
        raise _damaged(folder, f"{path.name} holds {size} bytes, but {says}")
    offsets_path = folder / f"{name}.docs.npy"
    try:
        offsets = np.load(offsets_path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise _damaged(folder, f"{offsets_path.name} is not a readable document index ({err})") from None
    if offsets.ndim != 1 or offsets.dtype.kind not in "iu" or len(offsets) != documents + 1:
        raise _damaged(folder, f"{offsets_path.name} does not hold {documents} + 1 integer document offsets")
    if int(offsets[0]) != 0 or int(offsets[-1]) != tokens or np.any(np.diff(offsets) < 0):
        raise _damaged(folder, f"{offsets_path.name} does not run from 0 to {tokens} without going back")
    if tokens == 0:
        return np.zeros(0, dtype=dtype), offsets
    return np.memmap(path, dtype=dtype, mode="r"), offsets


class TokenShards:
    """Read-only, memory-mapped view of one split of a ``prepare-data`` folder, checked when opened
    (a truncated shard would otherwise train on documents that come back short or empty)."""

    def __init__(self, folder: str | Path, split: str = "train"):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        metas = self.manifest["shards"] if split == "train" else [self.manifest["valid"]]
        checked = [check_shard(self.folder, m) for m in metas]
        self.tokens = [tokens for tokens, _ in checked]
        self.offsets = [offsets for _, offsets in checked]
        counts = np.array([len(o) - 1 for o in self.offsets], dtype=np.int64)
        self.doc_starts = np.concatenate([[0], np.cumsum(counts)])  # [shards + 1]
        sizes = np.array([o[-1] for o in self.offsets], dtype=np.int64)
        self.token_starts = np.concatenate([[0], np.cumsum(sizes)])

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


# ------------------------------------------------------------------------------ packing (pure)


def pair_slice(tokens: np.ndarray, start: int, stop: int, bos_id: int = BOS_ID) -> tuple[np.ndarray, np.ndarray]:
    """Pairs [start, stop) of one document shifted on its own: input j is ``<s>`` (j = 0) or token j-1, target j
    is token j. Only the slice is built, so a long document costs O(L) per row, not O(its length)."""
    targets = np.asarray(tokens[start:stop], dtype=np.int64)
    if start > 0:
        return np.asarray(tokens[start - 1 : stop - 1], dtype=np.int64), targets
    inputs = np.empty_like(targets)
    if inputs.size:
        inputs[0] = bos_id
        inputs[1:] = targets[:-1]
    return inputs, targets


def packed_row(
    row: int,
    ends: np.ndarray,
    fetch: Callable[[int, int], Sequence[np.ndarray]],
    seq_len: int,
    bos_id: int = BOS_ID,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row ``row`` of a packing: (inputs, targets, document ids), each [seq_len] int64.

    ``ends[i]`` is the number of pairs (= tokens) of documents 0..i in packing order (a cumulative
    sum) and ``fetch(a, b)`` returns the token arrays of documents a..b-1 in that order. The row
    holds pairs [row L, (row + 1) L) of the concatenated per-document pairs; see the module
    docstring for the document ids.
    """
    start = row * seq_len
    if row < 0 or start + seq_len > (int(ends[-1]) if len(ends) else 0):
        raise ValueError(f"row {row} is outside the packing ({int(ends[-1]) if len(ends) else 0} pairs)")
    first = int(np.searchsorted(ends, start, side="right"))  # the document holding the row's first pair
    last = int(np.searchsorted(ends, start + seq_len - 1, side="right"))  # ... and its last pair
    offset = start - (int(ends[first - 1]) if first else 0)
    if offset:  # continued from the previous row
        local = 0
    elif row == 0:
        local = first  # the epoch's first row counts every document from the start (empty ones too)
    else:  # the previous row ended with a whole document: the reference counts on from it (so from 1)
        local = first - int(np.searchsorted(ends, start - 1, side="right"))
    inputs, targets, ids = (np.empty(seq_len, dtype=np.int64) for _ in range(3))
    filled = 0
    for tokens in fetch(first, last + 1):
        take = min(len(tokens) - offset, seq_len - filled)
        inputs[filled : filled + take], targets[filled : filled + take] = pair_slice(
            tokens, offset, offset + take, bos_id
        )
        ids[filled : filled + take] = local
        filled, offset, local = filled + take, 0, local + 1
    if filled != seq_len:
        raise ValueError(f"the documents fetched for row {row} hold {filled} pairs, not {seq_len}: ends disagree")
    return inputs, targets, ids


@dataclass
class PackedRows:
    """Rows of a packing: inputs, targets and document ids, each [rows, L] int64."""

    inputs: np.ndarray
    targets: np.ndarray
    document_ids: np.ndarray


def pack_documents(documents: Sequence, seq_len: int, bos_id: int = BOS_ID) -> PackedRows:
    """The reference packing of ``documents`` (token-id sequences without ``<s>``) in the given order.

    Each document d gives the pairs ``[<s>, d0 .. d(n-2)] -> [d0 .. d(n-1)]``; the pairs of all
    documents are concatenated and cut into rows of exactly ``seq_len``; the incomplete tail is
    dropped. The loader builds its rows with the same ``packed_row``.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    docs = [np.asarray(d, dtype=np.int64) for d in documents]
    ends = np.cumsum([d.size for d in docs], dtype=np.int64)
    rows = (int(ends[-1]) if docs else 0) // seq_len
    built = [packed_row(k, ends, lambda a, b: docs[a:b], seq_len, bos_id) for k in range(rows)]
    if not built:
        empty = np.zeros((0, seq_len), dtype=np.int64)
        return PackedRows(empty, empty.copy(), empty.copy())
    return PackedRows(*(np.stack(part) for part in zip(*built, strict=True)))


# ------------------------------------------------------------------------------ packing loader


@dataclass
class Batch:
    """One rank's rows: inputs, targets and document ids are [B, L] int64; ``epoch`` is the data epoch
    of the global batch's first row (informational: the MD-rank rotation counts epochs in steps)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    document_ids: torch.Tensor
    epoch: int


@dataclass
class LoaderState:
    epoch: int = 0
    position: int = 0  # rows of this epoch already emitted, over all ranks (index into its row order)
    seed: int = 0


def _epoch_key(seed: int, epoch: int) -> int:
    return seed * SEED_STRIDE + epoch


def _row_key(seed: int, epoch: int) -> int:
    """A key for the row shuffle that is unrelated to the document shuffle's key of the same epoch."""
    mixed = _mix(np.array([_epoch_key(seed, epoch) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64), 0x526F7773)
    return int(mixed[0]) >> 8


class PackedLoader:
    """Infinite stream of packed batches; each call of ``next_batch`` advances the state by one global batch.

    ``shuffle=False`` keeps the documents and the rows in their stored order (the reference's
    packing fixture is made that way); training always shuffles.
    """

    BLOCK = 1 << 20  # documents permuted at once when an epoch's layout is built

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
        shuffle: bool = True,
    ):
        if repetitions < 1:
            raise UserError(f"repetitions must be >= 1, got {repetitions}")
        if seq_len < 1 or rows_per_rank < 1:
            raise UserError(f"seq_len and rows_per_rank must be >= 1, got {seq_len} and {rows_per_rank}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} outside world size {world_size}")
        self.shards, self.seq_len, self.rows = shards, seq_len, rows_per_rank
        self.rank, self.world_size, self.bos_id = rank, world_size, bos_id
        self.repetitions, self.shuffle = repetitions, shuffle
        budget = shards.num_tokens // repetitions
        self.num_docs, self.last_doc_tokens = shards.keep_first(budget)
        self.kept_tokens = budget
        if self.kept_tokens < seq_len:
            raise UserError(
                f"the kept data ({self.kept_tokens} tokens after 1/{repetitions} of the corpus) "
                f"cannot fill one row of {seq_len} tokens"
            )
        self.lengths = self._kept_lengths()  # [documents] int64: the only per-document array besides the layout
        self.state = LoaderState(seed=seed)
        self._layout: tuple[int, np.ndarray] | None = None  # (epoch, cumulative lengths in its order)

    def _kept_lengths(self) -> np.ndarray:
        lengths = np.concatenate([np.diff(np.asarray(o, dtype=np.int64)) for o in self.shards.offsets])
        lengths = lengths[: self.num_docs].copy()
        if self.last_doc_tokens:
            lengths[-1] = self.last_doc_tokens
        return lengths

    # -- state
    def state_dict(self) -> dict:
        return dict(vars(self.state))

    def load_state_dict(self, state: dict) -> None:
        fields = set(vars(LoaderState()))
        if set(state) != fields:
            raise UserError(
                f"the loader state holds {sorted(state)}, not {sorted(fields)}: it was saved by a dual-lm whose "
                "packing differs; start the run again"
            )
        counts = all(isinstance(state[k], int) and state[k] >= 0 for k in fields)
        if not counts or state["position"] >= self.rows_per_epoch:
            raise UserError(f"the loader state {state} does not fit this data ({self.rows_per_epoch} rows per epoch)")
        self.state = LoaderState(**state)

    @property
    def rows_per_epoch(self) -> int:
        """Rows one epoch yields over all ranks (its incomplete tail is dropped)."""
        return self.kept_tokens // self.seq_len

    # -- one epoch's order
    def document_order(self, epoch: int, index: np.ndarray | None = None) -> np.ndarray:
        """The kept documents' indices at positions ``index`` (default: all) of the epoch's packing order."""
        index = np.arange(self.num_docs) if index is None else np.asarray(index, dtype=np.int64)
        if not self.shuffle:
            return index
        return feistel_permutation(index, self.num_docs, _epoch_key(self.state.seed, epoch))

    def row_order(self, epoch: int, position: np.ndarray) -> np.ndarray:
        """Packing row emitted at ``position`` of the epoch (a keyed uniform shuffle of the rows)."""
        position = np.asarray(position, dtype=np.int64)
        if not self.shuffle:
            return position
        return feistel_permutation(position, self.rows_per_epoch, _row_key(self.state.seed, epoch))

    def _ends(self, epoch: int) -> np.ndarray:
        """Cumulative document lengths in the epoch's packing order, built in blocks and cached per epoch."""
        if self._layout is None or self._layout[0] != epoch:
            self._layout = None  # free the previous epoch's layout before building the next
            ends = np.empty(self.num_docs, dtype=np.int64)
            running = 0
            for lo in range(0, self.num_docs, self.BLOCK):
                hi = min(lo + self.BLOCK, self.num_docs)
                block = np.cumsum(self.lengths[self.document_order(epoch, np.arange(lo, hi))]) + running
                ends[lo:hi], running = block, int(block[-1])
            self._layout = (epoch, ends)
        return self._layout[1]

    def _document(self, doc: int) -> np.ndarray:
        tokens = self.shards.document(doc)
        return tokens[: self.lengths[doc]] if doc == self.num_docs - 1 else tokens

    def packed_row(self, epoch: int, row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Row ``row`` (in packing order) of epoch ``epoch``."""

        def fetch(a: int, b: int) -> list[np.ndarray]:
            return [self._document(int(d)) for d in self.document_order(epoch, np.arange(a, b))]

        return packed_row(row, self._ends(epoch), fetch, self.seq_len, self.bos_id)

    def next_batch(self) -> Batch:
        """This rank's rows of the next global batch (rank r takes rows [r*B, (r+1)*B))."""
        st, per_epoch = self.state, self.rows_per_epoch
        now = st.epoch * per_epoch + st.position  # index of the global batch's first row in the row stream
        mine = np.arange(now + self.rank * self.rows, now + (self.rank + 1) * self.rows)
        epochs, positions = np.divmod(mine, per_epoch)
        rows = []
        for epoch in np.unique(epochs):
            chosen = self.row_order(int(epoch), positions[epochs == epoch])
            rows.extend(self.packed_row(int(epoch), int(k)) for k in chosen)
        inputs, targets, ids = (torch.from_numpy(np.stack(part)) for part in zip(*rows, strict=True))
        batch = Batch(inputs, targets, ids, st.epoch)
        st.epoch, st.position = divmod(now + self.rows * self.world_size, per_epoch)
        return batch

    def __iter__(self):
        while True:
            yield self.next_batch()
