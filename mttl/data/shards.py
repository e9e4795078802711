"""Prepared-data folders: the Parquet row schema, the manifest, atomic writing, checking, reading.

A prepared folder is `DIR/manifest.json` plus Parquet shards `DIR/<split>/part-NNNNN.parquet`.
Every data source (NI, T0, CrossFit, synthetic) writes through `write_prepared`, which builds the
whole folder beside `DIR` and renames it into place only once it is complete, so a failed prepare
never leaves a manifest or partial shards behind and never damages an earlier good output.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mttl import storage
from mttl.errors import DataError
from mttl.paths import check_out_dir
from mttl.run_folder import make_staging, remove_stale_staging

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"

SCHEMA = pa.schema([
    pa.field("task_name", pa.string(), nullable=False),
    pa.field("task_id", pa.int32(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("target", pa.string(), nullable=False),
    pa.field("references", pa.list_(pa.string()), nullable=False),
    pa.field("answer_choices", pa.list_(pa.string()), nullable=True),
    pa.field("label", pa.int32(), nullable=False),
    pa.field("instance_id", pa.string(), nullable=False),
])

# Columns a source may leave out of a row, and how they are filled in.
_OPTIONAL_DEFAULTS = {"answer_choices": None, "label": -1}
_REQUIRED = ("task_name", "split", "source", "target")


def fingerprint_sources(paths: Iterable[str | os.PathLike], args: dict) -> str:
    """A hash of the source files and the prepare arguments.

    Files are hashed by path, size and modification time (not contents): re-hashing gigabytes of
    JSON on every no-op run would cost more than the prepare itself. Folders are walked.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps(args, sort_keys=True, default=str).encode())
    for root in sorted(str(p) for p in paths):
        root_path = Path(root)
        files = sorted(p for p in root_path.rglob("*") if p.is_file()) if root_path.is_dir() else [root_path]
        for path in files:
            try:
                stat = path.stat()
                digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
            except FileNotFoundError:
                digest.update(f"{path}\0missing\n".encode())
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def unchanged_manifest(out_dir: str | os.PathLike, fingerprint: str | None) -> dict | None:
    """The manifest of `out_dir` marked `"unchanged": True` when it was prepared from the same
    fingerprint and still passes `check`; None when it must be (re)built.

    Sources call this before reading their raw files so that a no-op run stays cheap.
    """
    if storage.is_uri(str(out_dir)):
        # a bucket's manifest is read, its shards are not downloaded to check them: a fingerprint
        # match is enough, as the manifest is uploaded last and removed first (a whole upload)
        raw = storage.read_bytes(storage.join(str(out_dir), MANIFEST)) if fingerprint is not None else None
        try:
            existing = json.loads(raw) if raw is not None else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        if not isinstance(existing, dict) or existing.get("fingerprint") != fingerprint:
            return None
        return {**existing, "unchanged": True}
    out = Path(out_dir)
    if fingerprint is None or not (out / MANIFEST).is_file():
        return None
    try:
        existing = read_manifest(out)
    except DataError:
        return None
    if existing.get("fingerprint") != fingerprint or check(out):
        return None
    return {**existing, "unchanged": True}


def _assign_task_ids(tasks: dict[str, dict]) -> dict[str, int]:
    """Task ids from the meta when given, else sorted task names → 0..n-1 (skipping taken ids)."""
    given = {name: int(meta["task_id"]) for name, meta in tasks.items() if meta.get("task_id") is not None}
    if len(set(given.values())) != len(given):
        raise DataError(f"duplicate task_id in task meta: {sorted(given.items(), key=lambda kv: kv[1])}")
    taken = set(given.values())
    ids = dict(given)
    next_id = 0
    for name in sorted(tasks):
        if name in ids:
            continue
        while next_id in taken:
            next_id += 1
        ids[name] = next_id
        taken.add(next_id)
    return ids


def _complete_row(row: dict, task_ids: dict[str, int]) -> dict:
    missing = [key for key in _REQUIRED if row.get(key) is None]
    if missing:
        raise DataError(f"row {row.get('instance_id', '?')} of task {row.get('task_name', '?')} lacks {missing}; "
                        "the source module must fill these columns")
    name = row["task_name"]
    if name not in task_ids:
        raise DataError(f"row of task {name!r} has no entry in the task meta passed to write_prepared")
    out = {key: row.get(key, default) for key, default in _OPTIONAL_DEFAULTS.items()}
    out.update({key: row[key] for key in _REQUIRED})
    out["task_id"] = task_ids[name]
    out["references"] = list(row.get("references") or [row["target"]])
    out["instance_id"] = str(row.get("instance_id") or "")  # "" → filled in by write_prepared
    if out["label"] is None:
        out["label"] = -1
    return out


class _ShardWriter:
    """Streams rows into `<split>/part-NNNNN.parquet` files of at most `rows_per_file` rows."""

    def __init__(self, root: Path, rows_per_file: int):
        self.root = root
        self.rows_per_file = rows_per_file
        self.pending: dict[str, list[dict]] = defaultdict(list)
        self.file_index: Counter = Counter()
        self.files: list[dict] = []

    def add(self, row: dict) -> None:
        bucket = self.pending[row["split"]]
        bucket.append(row)
        if len(bucket) >= self.rows_per_file:
            self._flush(row["split"])

    def close(self) -> list[dict]:
        for split in sorted(self.pending):
            if self.pending[split]:
                self._flush(split)
        return sorted(self.files, key=lambda f: f["path"])

    def _flush(self, split: str) -> None:
        rows = self.pending.pop(split)
        rel = f"{split}/part-{self.file_index[split]:05d}.parquet"
        self.file_index[split] += 1
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path)
        self.files.append({"path": rel, "rows": len(rows), "sha256": _file_sha256(path)})


def write_prepared(out_dir: str | os.PathLike, rows: Iterable[dict], tasks: dict[str, dict], *,
                   source: str, args: dict, skipped: dict | None = None, fingerprint: str | None = None,
                   rows_per_file: int = 50_000) -> dict:
    """Write rows as Parquet shards + manifest into `out_dir`, atomically; return the manifest.

    `tasks` maps task name → meta (`role`, `metric`, optional `task_id`, any extra keys such as
    `category`); the manifest's `rows` per split are counted here. When `out_dir/manifest.json`
    already carries the same `fingerprint`, nothing is written and the existing manifest is
    returned with `"unchanged": True`.
    """
    remote = storage.is_uri(str(out_dir))
    out = check_replaceable(out_dir)  # before the rows are generated, not after
    if not remote:
        remove_stale_staging(out)  # left by a killed earlier run: nothing else would ever remove them
    existing = unchanged_manifest(out, fingerprint)
    if existing is not None:
        return existing

    task_ids = _assign_task_ids(tasks)
    if remote:  # built in a local temporary folder, then uploaded: shards first, the manifest last
        staging = Path(tempfile.mkdtemp(prefix="mttl-prepare-"))
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = make_staging(out)
    try:
        writer = _ShardWriter(staging, rows_per_file)
        counts: dict[str, Counter] = defaultdict(Counter)
        for row in rows:
            full = _complete_row(row, task_ids)
            name = full["task_name"]
            if not full["instance_id"]:  # position within the task: stable for a deterministic source
                full["instance_id"] = f"{name}-{sum(counts[name].values())}"
            counts[name][full["split"]] += 1
            writer.add(full)
        files = writer.close()
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "source": source,
            "args": args,
            "fingerprint": fingerprint,
            "tasks": {
                name: {"task_id": task_ids[name], "role": meta.get("role", "train"),
                       "rows": dict(sorted(counts[name].items())), "metric": meta.get("metric", "rouge"),
                       **{k: v for k, v in meta.items() if k not in ("task_id", "role", "metric", "rows")}}
                for name, meta in sorted(tasks.items(), key=lambda kv: task_ids[kv[0]])
            },
            "files": files,
            "skipped": skipped or {},
        }
        # no temp file needed: the whole staging folder is renamed into place at once
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if remote:
            storage.upload_folder(staging, out, marker=None, last=(MANIFEST,))
            shutil.rmtree(staging, ignore_errors=True)
        else:
            _swap_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def check_replaceable(out: str | os.PathLike):
    """`out` may receive a prepared folder: it is new, empty, or an earlier prepared folder.
    Returns it as a Path, or as the URI string it is (`s3://bucket/prefix`)."""
    if storage.is_uri(str(out)):
        out = str(out).rstrip("/")
        storage.check_reachable(out)
        present = storage.list_files(out)
        if present and MANIFEST not in present:
            raise DataError(f"{out} holds objects and is not a prepared folder (no {MANIFEST}); "
                            "choose an empty or new --out prefix")
        return out
    out = check_out_dir(out, example="--out data/shards/ni")
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise DataError(f"{out} exists and is not a prepared folder (no {MANIFEST}); choose an empty or new --out")
    return out


def _swap_into_place(staging: Path, out: Path) -> None:
    """Rename the finished staging folder to `out`; an old `out` is moved aside first, then removed."""
    if not out.exists():
        os.replace(staging, out)
        return
    check_replaceable(out)
    old = make_staging(out, "old")
    os.replace(out, old / "previous")
    try:
        os.replace(staging, out)
    except BaseException:
        os.replace(old / "previous", out)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def read_manifest(data_dir: str | os.PathLike, *, verify: bool = False) -> dict:
    """The manifest of a prepared folder; DataError saying how to make one when missing or invalid.

    `verify=True` also checks the shards against it (`verify_shards`): for a driver about to
    start a run on the data, so a changed or corrupt shard stops it before Ray starts.
    """
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path} not found: prepare the data first, e.g. "
                        f"`mttl prepare ni --source DIR --out {data_dir}`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not valid JSON ({_one_line(err)}); delete the folder and run "
                        "`mttl prepare` again") from None
    _check_manifest_layout(path, manifest)
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise DataError(f"{path} has schema_version {manifest.get('schema_version')!r}, this mttl reads "
                        f"{SCHEMA_VERSION}; run `mttl prepare` again")
    if verify:
        verify_shards(data_dir, manifest)
    return manifest


def task_info(data_dir: str | os.PathLike, task: str) -> dict:
    """The manifest entry of `task`; DataError naming the folder when it is not there."""
    tasks = read_manifest(data_dir)["tasks"]
    if task not in tasks:
        held_out = sorted(t for t, meta in tasks.items() if meta.get("role") == "test")
        raise DataError(f"task '{task}' is not in {data_dir}/manifest.json; held-out tasks there: {held_out[:10]}")
    return tasks[task]


def _check_manifest_layout(path: Path, manifest) -> None:
    """The keys every reader relies on have the right types, and every listed file lies inside the folder."""
    redo = "delete the folder and run `mttl prepare` again"
    if not isinstance(manifest, dict):
        raise DataError(f"{path} must hold a JSON object; {redo}")
    tasks, files = manifest.get("tasks"), manifest.get("files")
    if not isinstance(tasks, dict):
        raise DataError(f"{path}: 'tasks' must be an object of task name -> meta, got {type(tasks).__name__}; {redo}")
    if not tasks:
        raise DataError(f"{path} lists no tasks: nothing to train or evaluate on; prepare a source that has tasks")
    for name, meta in tasks.items():
        rows = meta.get("rows", {}) if isinstance(meta, dict) else None
        if not isinstance(rows, dict) or not all(_is_int(n) for n in rows.values()):
            raise DataError(f"{path}: tasks[{name!r}] must be an object whose 'rows' maps split -> count; {redo}")
    if not isinstance(files, list):
        raise DataError(f"{path}: 'files' must be a list of {{path, rows, sha256}}, got {type(files).__name__}; {redo}")
    for index, entry in enumerate(files):
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not entry["path"]:
            raise DataError(f"{path}: files[{index}] lacks a 'path' string; {redo}")
        rel = entry["path"]
        if os.path.isabs(rel) or ".." in Path(rel).parts or "\\" in rel:
            raise DataError(f"{path}: files[{index}] path {rel!r} points outside {path.parent}; "
                            f"shards must lie inside the prepared folder; {redo}")
        if not _is_int(entry.get("rows")):
            raise DataError(f"{path}: files[{index}] 'rows' must be an integer, got {entry.get('rows')!r}; {redo}")
        sha = entry.get("sha256")
        if not isinstance(sha, str) or len(sha) != 64 or not all(c in "0123456789abcdef" for c in sha):
            raise DataError(f"{path}: files[{index}] 'sha256' must be 64 hex digits, got {sha!r}; {redo}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check(data_dir: str | os.PathLike) -> list[str]:
    """Problems of a prepared folder against its manifest (empty list when all is well).

    Checks every listed file exists, has the recorded sha256, reads as Parquet with the row
    schema and holds the recorded number of rows, and that per-task row counts add up. One
    problem line per damaged file (`mttl prepare check` prints them, one per line).
    """
    root = Path(data_dir)
    try:
        manifest = read_manifest(root)
    except DataError as err:
        return [str(err)]
    problems = []
    listed_rows = 0
    for entry in manifest["files"]:
        path = root / entry["path"]
        listed_rows += entry["rows"]
        problem = _shard_problem(path, entry)
        if problem == "missing":
            problems.append(f"{path}: missing (listed in {MANIFEST})")
            continue
        issues = [problem] if problem else []  # one line per damaged file, all of its problems on it
        try:
            metadata = pq.read_metadata(path)
            pq.read_table(path, schema=SCHEMA)
            if metadata.num_rows != entry["rows"]:
                issues.append(f"{metadata.num_rows} rows, {MANIFEST} says {entry['rows']}")
        except (pa.ArrowException, OSError) as err:
            issues.append(f"unreadable Parquet ({_one_line(err)})")
        if issues:
            problems.append(f"{path}: {'; '.join(issues)}")
    task_rows = sum(sum(meta.get("rows", {}).values()) for meta in manifest["tasks"].values())
    if not problems and task_rows != listed_rows:
        problems.append(f"{root / MANIFEST}: tasks count {task_rows} rows but files hold {listed_rows}")
    return problems


def _shard_problem(path: Path, entry: dict) -> str | None:
    """"missing", the sha256 mismatch, or None when the file is what the manifest recorded."""
    if not path.is_file():
        return "missing"
    if _file_sha256(path) != entry.get("sha256"):
        return f"sha256 differs from {MANIFEST} (file changed or corrupt)"
    return None


# Beside the shards: (path, size, mtime) of files whose sha256 was found to match, so a large
# prepared folder is hashed once, not on every run. Any change of size or mtime re-hashes.
VERIFIED_CACHE = ".verified-sha256.json"


def verify_shards(data_dir: str | os.PathLike, manifest: dict | None = None) -> dict:
    """The manifest, after checking each listed shard exists and has its recorded sha256.

    DataError names the first bad shard and says to prepare the data again. Cheaper than `check`
    (no Parquet decoding: a shard with the sha256 `mttl prepare` recorded is the file it wrote),
    and files already verified at the same size and mtime are not hashed again (VERIFIED_CACHE,
    written only where the folder is writable).
    """
    root = Path(data_dir)
    manifest = read_manifest(root) if manifest is None else manifest
    cache_path = root / VERIFIED_CACHE
    try:
        cached = json.loads(cache_path.read_text(encoding="utf-8"))
        cached = cached if isinstance(cached, dict) else {}
    except (OSError, ValueError):
        cached = {}
    verified = {}
    for entry in manifest["files"]:
        path = root / entry["path"]
        try:
            stat = path.stat()
        except OSError:
            stat = None
        stamp = [stat.st_size, stat.st_mtime_ns, entry.get("sha256")] if stat else None
        if stamp is not None and cached.get(entry["path"]) == stamp:
            verified[entry["path"]] = stamp
            continue
        problem = _shard_problem(path, entry)
        if problem:
            raise DataError(f"{path}: {'missing' if problem == 'missing' else problem}, so the data no longer matches "
                            f"{root / MANIFEST}; run `mttl prepare` again to rebuild {root} "
                            f"(`mttl prepare check {root}` lists every problem)")
        verified[entry["path"]] = stamp
    if verified != cached:
        tmp = cache_path.with_name(f"{VERIFIED_CACHE}.tmp-{os.getpid()}")
        try:
            tmp.write_text(json.dumps(verified) + "\n")
            os.replace(tmp, cache_path)
        except OSError:  # a read-only folder (shared data) is simply hashed each time
            tmp.unlink(missing_ok=True)
    return manifest


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300]


def read_rows(data_dir: str | os.PathLike, *, tasks: Iterable[str] | None = None,
              splits: Iterable[str] | None = None, columns: list[str] | None = None) -> pa.Table:
    """Rows of a prepared folder as one pyarrow Table, filtered by task names and splits.

    Raises DataError naming the file when a shard is missing, truncated or not Parquet.
    """
    root = Path(data_dir)
    manifest = read_manifest(root)
    wanted_splits = None if splits is None else set(splits)
    wanted_tasks = None if tasks is None else set(tasks)
    if wanted_tasks is not None:
        unknown = sorted(wanted_tasks - set(manifest["tasks"]))
        if unknown:
            raise DataError(f"{root / MANIFEST} has no task(s) {unknown[:5]}{' …' if len(unknown) > 5 else ''}; "
                            "see the manifest's 'tasks' for the names")
    read_columns = None if columns is None else list(dict.fromkeys([*columns, "task_name", "split"]))
    tables = []
    for entry in manifest["files"]:
        path = root / entry["path"]
        try:
            table = pq.read_table(path, schema=SCHEMA, columns=read_columns)
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"{path}: cannot read Parquet ({_one_line(err)}); run `mttl prepare check {root}` "
                            "and prepare the data again") from None
        if wanted_splits is not None:
            table = table.filter(pc.is_in(table["split"], pa.array(sorted(wanted_splits), pa.string())))
        if wanted_tasks is not None:
            table = table.filter(pc.is_in(table["task_name"], pa.array(sorted(wanted_tasks), pa.string())))
        tables.append(table)
    schema = SCHEMA if read_columns is None else pa.schema([SCHEMA.field(c) for c in read_columns])
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    return table.select(columns) if columns is not None else table
