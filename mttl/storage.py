"""Object storage: `output_dir`, `data_dir`, `checkpoint` and `--out` given as URIs (`s3://bucket/prefix`, `gs://…`).

Built on `pyarrow.fs.FileSystem.from_uri`, so every filesystem pyarrow takes works; S3 credentials,
endpoint and region come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3, AWS_DEFAULT_REGION), never from a config file, and no
message here ever holds them. A command working on a URI reads what it needs into a local folder
under `cache_dir` (`local_mirror`) and writes outputs locally first, then uploads them: object
stores have no rename, so a folder is uploaded file by file with its marker (`COMPLETE`, or a
prepared folder's manifest) written last and removed first, and a reader takes a folder as whole
only when the marker is there.

Imports pyarrow only when a URI is used: a local path never touches this module's filesystems.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from mttl.errors import ConfigError

COMPLETE = "_COMPLETE"  # written last into an uploaded folder (`final/`): the folder is whole
MIRROR_DIR = "storage"  # in cache_dir: local copies of what commands read from URIs, by scheme/bucket/key
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(path) -> bool:
    """A `scheme://…` location other than `file://` (a plain local path is not one)."""
    return isinstance(path, str) and bool(_URI.match(path)) and not path.startswith("file://")


def join(base: str, *parts: str) -> str:
    """`base/part/…` for a URI (no os.path rules: '//' after the scheme stays)."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts if p)])


def _how_to_fix(uri: str) -> str:
    return (f"check that the bucket of {uri} exists and that AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
            "(and AWS_ENDPOINT_URL for an S3-compatible server, AWS_DEFAULT_REGION) are set in the environment")


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:300]


def storage_error(uri: str, err: BaseException, doing: str = "reach") -> ConfigError:
    """A filesystem error on `uri` as one line naming the URI and what to do."""
    return ConfigError(f"cannot {doing} {uri} ({_one_line(err)}); {_how_to_fix(uri)}")


def _s3_from_environment():
    """An S3 filesystem holding the environment's keys and endpoint itself, so that it still works
    once pickled to Ray workers whose processes were started without those variables; None when the
    environment holds no keys (pyarrow's own lookup then applies: instance roles, ~/.aws)."""
    import pyarrow.fs as pafs

    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not (key and secret):
        return None
    kwargs = {"access_key": key, "secret_key": secret, "session_token": os.environ.get("AWS_SESSION_TOKEN"),
              "region": os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host.rstrip("/") if host else scheme, scheme=scheme if host else "https")
    return pafs.S3FileSystem(**kwargs)


def filesystem(uri: str, fs=None):
    """(pyarrow filesystem, path inside it) of `uri` (`fs` when given); ConfigError naming the URI
    when pyarrow cannot make one."""
    import pyarrow.fs as pafs

    if fs is not None:
        return fs, uri.split("://", 1)[1]
    try:
        if uri.startswith("s3://"):
            s3 = _s3_from_environment()
            if s3 is not None:
                return s3, uri[len("s3://"):]
        return pafs.FileSystem.from_uri(uri)
    except (OSError, ValueError, TypeError) as err:
        raise storage_error(uri, err, "open a filesystem for") from None


def check_reachable(uri: str) -> None:
    """The bucket of `uri` answers with these credentials: one line naming the URI otherwise."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    bucket = path.split("/", 1)[0]
    try:
        info = fs.get_file_info(bucket)
    except OSError as err:
        raise storage_error(uri, err) from None
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"the bucket '{bucket}' of {uri} does not exist; create it or fix the URI")


def exists(uri: str, fs=None) -> bool:
    import pyarrow.fs as pafs

    fs, path = filesystem(uri, fs)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as err:
        raise storage_error(uri, err) from None


def read_bytes(uri: str, fs=None) -> bytes | None:
    """The bytes of the object at `uri`, None when there is none."""
    fs, path = filesystem(uri, fs)
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError:
        return None
    except OSError as err:
        if "not exist" in str(err) or "NotFound" in str(err) or "NoSuchKey" in str(err):
            return None
        raise storage_error(uri, err, "read") from None


def write_bytes(uri: str, data: bytes, fs=None) -> None:
    """One object written whole (an S3 PUT is atomic: readers see the old or the new object)."""
    fs, path = filesystem(uri, fs)
    try:
        with fs.open_output_stream(path) as stream:
            stream.write(data)
    except OSError as err:
        raise storage_error(uri, err, "write") from None


def list_files(uri: str, fs=None) -> list[str]:
    """Paths (relative to `uri`, '/'-separated) of every object under `uri`; [] when there is none."""
    return sorted(file_sizes(uri, fs))


def file_sizes(uri: str, fs=None) -> dict[str, int]:
    """Size in bytes of every object under `uri`, by its path relative to `uri`; {} when there is none."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri, fs)
    path = path.rstrip("/")
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except OSError as err:
        raise storage_error(uri, err, "list") from None
    return {i.path[len(path) + 1:]: i.size for i in infos if i.type == pafs.FileType.File}


def delete(uri: str, files: list[str] | None = None, fs=None) -> None:
    """Remove `files` (relative) under `uri`, or everything under it."""
    fs, path = filesystem(uri, fs)
    path = path.rstrip("/")
    try:
        for rel in files if files is not None else list_files(uri, fs):
            fs.delete_file(f"{path}/{rel}")
    except OSError as err:
        raise storage_error(uri, err, "delete under") from None


CHUNK = 8 << 20  # bytes per read while streaming a file: a multi-GB checkpoint never sits in memory whole


def upload_file(local: str | os.PathLike, uri: str, fs=None) -> None:
    """One local file streamed to `uri` (S3: a multipart upload, visible only once complete)."""
    fs, path = filesystem(uri, fs)
    try:
        with open(local, "rb") as source, fs.open_output_stream(path) as stream:
            shutil.copyfileobj(source, stream, CHUNK)
    except OSError as err:
        raise storage_error(uri, err, "write") from None


def upload_folder(local: str | os.PathLike, uri: str, *, marker: str | None = COMPLETE,
                  last: tuple[str, ...] = (), replace: bool = True, fs=None) -> list[str]:
    """Copy the files of folder `local` to `uri`: the marker is removed first and written last, then
    the files named in `last`; with `replace`, objects under `uri` that `local` lacks are removed
    (before anything new is written, so no reader mixes old and new). Returns the uploaded paths."""
    local = Path(local)
    files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    present = list_files(uri, fs)
    if marker and marker in present:
        delete(uri, [marker], fs)
    for rel in last:  # what says "whole" for a folder without a marker (a prepared folder's manifest)
        if rel in present:
            delete(uri, [rel], fs)
    if replace:
        delete(uri, [rel for rel in present if rel not in files and rel != marker and rel not in last], fs)
    ordered = [f for f in files if f not in last and f != marker] + [f for f in last if f in files]
    for rel in ordered:
        upload_file(local / rel, join(uri, rel), fs)
    if marker:
        write_bytes(join(uri, marker), b"", fs)
    return ordered


def download_folder(uri: str, local: str | os.PathLike, *, files: list[str] | None = None, fs=None) -> Path:
    """Copy the objects under `uri` (or only `files`, relative paths) into folder `local`."""
    local = Path(local)
    fs, path = filesystem(uri, fs)
    path = path.rstrip("/")
    for rel in files if files is not None else list_files(uri, fs):
        target = local / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:  # streamed into a temp file, renamed when whole: a reader never sees half a file
            with fs.open_input_stream(f"{path}/{rel}") as stream, open(tmp, "wb") as out:
                shutil.copyfileobj(stream, out, CHUNK)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise storage_error(join(uri, rel), err, "read") from None
        os.replace(tmp, target)
    return local


def local_mirror(uri: str, cache_dir: str | os.PathLike) -> Path:
    """The local folder under `cache_dir` that holds this machine's copy of `uri`."""
    scheme, rest = uri.split("://", 1)
    parts = [re.sub(r"[^A-Za-z0-9._=-]", "_", p) for p in rest.split("/") if p not in ("", ".", "..")]
    return Path(os.path.expanduser(str(cache_dir))).absolute() / MIRROR_DIR / scheme / Path(*parts)


def download_complete_folder(uri: str, local: str | os.PathLike, fs=None) -> Path | None:
    """A whole uploaded folder (its marker present) copied into `local` (replacing it); None without marker."""
    files = list_files(uri, fs)
    if COMPLETE not in files:
        return None
    local = Path(local)
    shutil.rmtree(local, ignore_errors=True)
    return download_folder(uri, local, files=files, fs=fs)


def pull(uri: str, local: str | os.PathLike, names: list[str], fs=None) -> list[str]:
    """The files `names` of folder `uri` that exist there, copied into folder `local`; returns those names."""
    present = set(list_files(uri, fs))
    found = [name for name in names if name in present]
    download_folder(uri, local, files=found, fs=fs)
    return found


def push(local: str | os.PathLike, uri: str, names: list[str], fs=None) -> None:
    """The files `names` of folder `local` that exist, each uploaded whole to folder `uri`."""
    for name in names:
        if (Path(local) / name).is_file():
            upload_file(Path(local) / name, join(uri, name), fs)


def pull_folder(uri: str, local: str | os.PathLike, fs=None) -> Path:
    """`local` made a copy of everything under `uri` (an empty folder when nothing is there yet), built
    beside it and swapped in whole: a folder a command works in locally and pushes back with
    `upload_folder` (a sweep's studies, whose Ray Tune state is many small files)."""
    check_reachable(uri)
    local = Path(local)
    staging = local.with_name(f".{local.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    download_folder(uri, staging, files=list_files(uri, fs), fs=fs)
    _swap_into_place(staging, local)
    return local


_COPIED: dict[tuple[str, str], Path] = {}  # (uri, cache_dir) -> the copy this process made of a run


def local_run_copy(uri: str, cache_dir: str | os.PathLike, *, folders: tuple[str, ...] = ()) -> Path:
    """A run folder at `uri` as a local folder under `cache_dir` that commands read like any run folder:
    its top-level files, plus each of `folders` whose upload is complete (copied once per process: a
    command reads its checkpoint several times). ConfigError when `uri` holds nothing."""
    key = (uri, str(cache_dir))
    if key in _COPIED and _COPIED[key].is_dir():
        return _COPIED[key]
    check_reachable(uri)
    files = list_files(uri)
    if not files:
        raise ConfigError(f"{uri} holds no run folder (nothing under it); give $output_dir/$run_name of a run")
    local = local_mirror(uri, cache_dir)
    # built beside the mirror and swapped in whole: several processes of one node (the Ray tasks of a
    # fan-out) copy the same run into the same cache at once, and must never read one another's half
    staging = local.with_name(f".{local.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    download_folder(uri, staging, files=[f for f in files if "/" not in f])
    for folder in folders:
        download_complete_folder(join(uri, folder), staging / folder)
    _swap_into_place(staging, local)
    _COPIED[key] = local
    return local


def local_folder_copy(uri: str, cache_dir: str | os.PathLike) -> Path:
    """A folder at `uri` (a backbone written by `save_pretrained`, e.g. a run's `final/backbone`) as a
    local folder under `cache_dir` that transformers loads like any other. Downloaded once per machine:
    a copy already there with the same files and sizes is used as it is (every worker of a node asks
    for it); else it is built beside the mirror and swapped in whole. ConfigError when `uri` holds nothing."""
    check_reachable(uri)
    sizes = file_sizes(uri)
    if not sizes:
        raise ConfigError(f"{uri} holds no files; give the URI of a folder written by save_pretrained "
                          "(e.g. <output_dir>/<run_name>/final/backbone)")
    local = local_mirror(uri, cache_dir)
    if all((local / rel).is_file() and (local / rel).stat().st_size == size for rel, size in sizes.items()):
        return local
    staging = local.with_name(f".{local.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    download_folder(uri, staging, files=list(sizes))
    _swap_into_place(staging, local)
    return local


def _swap_into_place(staging: Path, local: Path) -> None:
    """`staging` becomes `local`; an older copy there is moved aside first and removed after."""
    old = local.with_name(f".{local.name}.old-{os.getpid()}")
    try:
        os.rename(local, old)
    except FileNotFoundError:
        old = None
    try:
        os.rename(staging, local)
    except OSError:  # another process put its whole copy there in between: the same objects, keep it
        shutil.rmtree(staging, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
