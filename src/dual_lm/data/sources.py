"""Inputs read through Hugging Face ``datasets``: local csv/tsv/arrow files (csv and tsv also
compressed), folders written by ``save_to_disk``, and dataset names on the hub (``hf:NAME``).

Files and names are streamed (``streaming=True``): nothing is loaded into memory and no Arrow
cache is written (a local file's read uses a temporary cache folder, removed after it). A
``save_to_disk`` folder is memory-mapped where it lies. Every source reads in the same order on
every pass, which prepare-data needs (it counts the documents in one pass and tokenises them in a
second); a hub dataset is pinned to the commit it resolved to when the run started.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import lzma
import os
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dual_lm.data.documents import ReadStats, column_texts, cut_text, damaged_input, missing_column
from dual_lm.errors import UserError

HUB_PREFIX = "hf:"
BATCH_ROWS = 1024
_COMPRESSIONS = ("", ".gz", ".bz2", ".xz", ".zst")
# suffix -> (datasets' packaged builder, its options); arrow files cannot be read compressed
DATASET_FORMATS: dict[str, tuple[str, dict]] = {
    **{f".csv{c}": ("csv", {}) for c in _COMPRESSIONS},
    **{f".tsv{c}": ("csv", {"sep": "\t"}) for c in _COMPRESSIONS},
    ".arrow": ("arrow", {}),
}
_TRUTHY = {"1", "ON", "YES", "TRUE"}


def _damage_types() -> tuple[type[BaseException], ...]:
    """What the decoders behind ``datasets`` raise for a damaged file (pandas' errors are ValueErrors)."""
    import pyarrow as pa
    import zstandard

    return (ValueError, OSError, EOFError, pa.ArrowException, zlib.error, lzma.LZMAError, zstandard.ZstdError)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """``datasets`` logs a damaged file before raising: the one-line error says it instead."""
    import datasets

    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)


def stat_line(path: Path) -> str:
    """A file's name plus its size and modification time (prepare-data's fingerprint of a file)."""
    stat = path.stat()
    return f"{path} ({stat.st_size} bytes, mtime {stat.st_mtime_ns})"


@dataclass(frozen=True)
class DatasetFile:
    """One local file read by a packaged ``datasets`` builder, streamed."""

    path: Path
    fmt: str  # a key of DATASET_FORMATS

    takes_split = False
    takes_name = False
    is_text = False

    def fingerprint(self) -> str:
        return stat_line(self.path)

    def read(self, text_field: str, split_documents: str, stats: ReadStats) -> Iterator[str]:
        import datasets

        builder, options = DATASET_FORMATS[self.fmt]
        files = [str(self.path.resolve())]
        # a cache folder of this read only: streaming writes nothing there but a lock file, which would
        # otherwise be left in ~/.cache for every file ever read
        with _quiet(), tempfile.TemporaryDirectory(prefix="dual-lm-datasets-") as cache:
            try:
                ds = datasets.load_dataset(
                    builder, data_files=files, split="train", streaming=True, cache_dir=cache, **options
                )
                yield from column_texts(_batches(ds, text_field, str(self.path)), text_field, str(self.path), stats)
            except UserError:
                raise
            except _damage_types() as err:
                raise damaged_input(self.path, self.fmt.lstrip("."), err) from None


def _batches(ds: Any, text_field: str, where: str) -> Iterator[dict]:
    """Batches of only the text column when the columns are known up front, else of whole rows."""
    columns = ds.column_names
    if columns is not None:
        if text_field not in columns:
            raise missing_column(where, text_field, list(columns))
        ds = ds.select_columns([text_field])
    return ds.iter(batch_size=BATCH_ROWS)


# ------------------------------------------------------------------------------ save_to_disk folders


def disk_kind(path: Path) -> str | None:
    """``dataset`` or ``dict`` for a folder ``save_to_disk`` wrote, else None."""
    if (path / "dataset_dict.json").is_file():
        return "dict"
    if (path / "dataset_info.json").is_file() and (path / "state.json").is_file():
        return "dataset"
    return None


def _dict_splits(path: Path) -> list[str]:
    try:
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise damaged_input(path / "dataset_dict.json", "save_to_disk", err) from None
    if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
        raise UserError(f"{path / 'dataset_dict.json'} does not list its splits; re-create the folder")
    return splits


@dataclass(frozen=True)
class DiskDataset:
    """A ``Dataset`` folder written by ``save_to_disk`` (for a DatasetDict: the folder of one split)."""

    path: Path  # the folder given (the DatasetDict's folder for a split)
    split: str | None = None

    takes_name = False
    is_text = False

    @property
    def takes_split(self) -> bool:
        return self.split is not None

    @property
    def folder(self) -> Path:
        return self.path / self.split if self.split is not None else self.path

    def fingerprint(self) -> str:
        """The folder, its split, and a digest of every file's name, size and modification time."""
        files = sorted(p for p in self.folder.rglob("*") if p.is_file())
        digest = hashlib.sha256("\n".join(stat_line(p) for p in files).encode()).hexdigest()[:16]
        split = f", split {self.split}" if self.split is not None else ""
        return f"{self.path} (save_to_disk{split}, {len(files)} files, {digest})"

    def read(self, text_field: str, split_documents: str, stats: ReadStats) -> Iterator[str]:
        import datasets

        where = f"{self.path}" + (f" (split {self.split})" if self.split is not None else "")
        with _quiet():
            try:
                ds = datasets.load_from_disk(str(self.folder))
                if text_field not in ds.column_names:
                    raise missing_column(where, text_field, list(ds.column_names))
                batches = ds.select_columns([text_field]).iter(batch_size=BATCH_ROWS)
                yield from column_texts(batches, text_field, where, stats)
            except UserError:
                raise
            except _damage_types() as err:
                raise damaged_input(self.folder, "save_to_disk", err) from None


def open_disk_dataset(path: Path, split: str | None) -> DiskDataset:
    """The source of a ``save_to_disk`` folder; a DatasetDict needs ``--split`` (one of its splits)."""
    if disk_kind(path) == "dataset":
        return DiskDataset(path)
    splits = _dict_splits(path)
    if split is None:
        raise UserError(f"{path} is a DatasetDict folder with splits {', '.join(splits)}; choose one with --split")
    if split not in splits or disk_kind(path / split) != "dataset":
        raise UserError(f"{path} has no split {split!r} (splits: {', '.join(splits)})")
    return DiskDataset(path, split)


# ------------------------------------------------------------------------------ the hub


def hub_offline() -> bool:
    """Whether the hub is switched off here (read now, not when ``datasets`` was imported)."""
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    if any(os.environ.get(n, "").upper() in _TRUTHY for n in names):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _reason(err: BaseException) -> str:
    return " ".join(str(err).split())[:300] or type(err).__name__


@dataclass(frozen=True)
class HubDataset:
    """A dataset on the Hugging Face hub, streamed at the commit it resolved to."""

    name: str
    config: str | None
    split: str
    revision: str
    is_text: bool  # read by datasets' ``text`` builder: --split-documents applies
    dataset: Any = field(compare=False, repr=False)

    takes_split = True
    takes_name = True

    def fingerprint(self) -> str:
        config = self.config or "default"
        return f"{HUB_PREFIX}{self.name} (config {config}, split {self.split}, revision {self.revision})"

    def read(self, text_field: str, split_documents: str, stats: ReadStats) -> Iterator[str]:
        where = f"{HUB_PREFIX}{self.name}"
        try:
            with _quiet():
                texts = column_texts(self.dataset.iter(batch_size=BATCH_ROWS), text_field, where, stats)
                mode = split_documents if self.is_text else "file"
                for text in texts:
                    yield from (t for t in cut_text(text, mode) if t.strip())
        except UserError:
            raise
        except Exception as err:  # the network or the hub's files: one line, the finished shards stay
            raise UserError(f"reading {where} failed ({_reason(err)}); re-run to resume once it is reachable") from None


_SAMPLE_BY = {"file": "document", "lines": "line", "blank-lines": "paragraph"}


def open_hub(name: str, config: str | None, split: str, split_documents: str) -> HubDataset:
    """Resolve ``hf:NAME`` to a commit and open its split as a stream; offline, one line that says
    how to use a local copy instead."""
    if not name:
        raise UserError("hf: needs a dataset name, e.g. hf:OWNER/NAME")
    if hub_offline():
        raise UserError(
            f"{HUB_PREFIX}{name} needs the Hugging Face hub, which is offline here (HF_HUB_OFFLINE or "
            "HF_DATASETS_OFFLINE is set); unset it where the hub is reachable, or save a local copy there "
            f"(datasets.load_dataset({name!r}).save_to_disk(DIR), or `hf download {name} --repo-type dataset "
            "--local-dir DIR`) and pass --input DIR"
        )
    import datasets

    revision = _resolve_revision(name)
    try:
        with _quiet():
            ds = datasets.load_dataset(name, config, split=split, revision=revision, streaming=True)
            is_text = ds.info.builder_name == "text"
            if is_text:  # one row per file / line / paragraph, as --split-documents asks
                sample_by = _SAMPLE_BY[split_documents]
                ds = datasets.load_dataset(
                    name, config, split=split, revision=revision, streaming=True, sample_by=sample_by
                )
    except Exception as err:  # an unknown config or split (datasets lists the available ones), the network
        raise UserError(f"cannot open {HUB_PREFIX}{name} ({_reason(err)})") from None
    return HubDataset(name, config, split, revision, is_text, ds)


def _resolve_revision(name: str) -> str:
    """The commit the dataset's main branch points at, so both passes (and a resumed run) read the same."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    try:
        info = HfApi().dataset_info(name)
    except HFValidationError as err:
        raise UserError(f"{HUB_PREFIX}{name} is not a valid dataset name ({_reason(err)})") from None
    except GatedRepoError:
        raise UserError(f"{HUB_PREFIX}{name} is gated: accept its terms on the hub, then `hf auth login`") from None
    except RepositoryNotFoundError:
        raise UserError(f"there is no dataset {name!r} on the hub (if it is private: `hf auth login`)") from None
    except Exception as err:
        raise UserError(
            f"the Hugging Face hub is unreachable for {HUB_PREFIX}{name} ({_reason(err)}); "
            "save a local copy where it is reachable and pass its folder to --input"
        ) from None
    if not info.sha:
        raise UserError(f"the hub gave no commit for {HUB_PREFIX}{name}; try again")
    return info.sha
