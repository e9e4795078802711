"""Trust in a sweep folder's Ray Tune state: this user's mttl signs what Tune saves, and a resume
refuses any state file it did not sign.

Tune keeps a study's state as pickles (`tuner.pkl`, `searcher-state-*.pkl`,
`search_gen_state-*.json`, …) and as JSON with embedded pickles (`experiment_state-*.json`);
restoring a study unpickles them, which runs whatever code a planted file carries. Sweep folders
may sit on shared storage, so a study is restored only when every such file carries an
HMAC-SHA256 made with this user's key (`~/.config/mttl/sweep-state.key`, mode 0600, created on
first use; `MTTL_STATE_KEY_FILE` names another file). The signatures are kept beside the state
(`SIGNATURES_FILE`): without the key nobody can make one, so someone who can write the folder can
delete or change files but not make a resume load them. A folder signed under another key (another
machine or user) is refused too; `-k trust_sweep_state=True` adopts it after the user has
decided to trust it.

When signing happens, all in the sweep's driver process:
- `tuner.pkl`, right after `tune.Tuner(...)` wrote it (`sign_files`);
- the rest in `SignStateCallback.get_state`, which Tune calls each time it has saved the study
  state into its local staging folder, before it copies that folder into the study folder (and
  once more at the end of the experiment). A study folder holds copies a few saves old while a
  copy is on its way, so the last `KEPT_VERSIONS` signatures of each file are kept.

What it does not cover: a file swapped in the moment between `verify_state` and Tune reading it.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path
from typing import Callable

from ray.tune import Callback

from mttl.errors import CheckpointError, ConfigError

KEY_ENV = "MTTL_STATE_KEY_FILE"
SIGNATURES_FILE = "mttl-state-signatures.json"
TUNER_FILE = "tuner.pkl"
# The files Tune reads back when it restores a study (each is, or embeds, a pickle); any other
# top-level *.pkl is treated the same, so a file a later Ray adds is refused rather than trusted.
STATE_PATTERNS = (TUNER_FILE, "experiment_state-*.json", "searcher-state-*.pkl", "search_gen_state-*.json",
                  "basic-variant-state-*.json", "callback-states-*.pkl", "*.pkl")
KEPT_VERSIONS = 16
TRUST_HINT = ("if you trust every file in that folder (say the sweep ran on another machine of yours), resume with "
              "-k trust_sweep_state=True; otherwise use a new run_name")


# ------------------------------------------------------------------------------------ the key
def key_path() -> Path:
    if os.environ.get(KEY_ENV):
        return Path(os.environ[KEY_ENV]).expanduser()
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config_home) / "mttl" / "sweep-state.key"


def _create_key(path: Path) -> None:
    """A fresh random key, created atomically with mode 0600 (never readable by others, not even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        try:
            os.link(tmp, path)  # fails when another process made the key first: theirs is used
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)


def load_key() -> bytes:
    """This user's signing key, created on first use; ConfigError when others could read or replace it."""
    path = key_path()
    if not path.exists():
        try:
            _create_key(path)
        except OSError as err:
            raise ConfigError(f"cannot create the sweep-state key {path} ({err.strerror or err}); "
                              f"set {KEY_ENV} to a file in a folder you own") from None
    info = path.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise ConfigError(f"sweep-state key {path} must belong to you and be readable by you only "
                          f"(mode {oct(info.st_mode & 0o777)}): run `chmod 600 {path}`, or delete it to get a new one")
    text = path.read_text(encoding="utf-8", errors="replace").strip()
    if len(text) < 32:
        raise ConfigError(f"sweep-state key {path} is not a key mttl made; delete it to get a new one")
    return text.encode()


def _key_id(key: bytes) -> str:
    return hashlib.sha256(b"mttl sweep-state key id\0" + key).hexdigest()[:16]


def _digest(key: bytes, name: str, data: bytes) -> str:
    return hmac.new(key, name.encode() + b"\0" + data, hashlib.sha256).hexdigest()


# ---------------------------------------------------------------------------------- signatures
def state_files(folder: Path) -> list[Path]:
    """The top-level files of `folder` that Tune unpickles when it restores the study."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name != SIGNATURES_FILE
                  and any(fnmatch.fnmatchcase(p.name, pattern) for pattern in STATE_PATTERNS))


def _read_signatures(study_dir: Path) -> dict | None:
    try:
        data = json.loads((study_dir / SIGNATURES_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        return None
    return data


def sign_files(study_dir: Path, files: list[Path], *, replace: bool = False) -> None:
    """Add the signatures of `files` (read now) to `study_dir`'s signatures file.

    `replace` starts the file afresh; so does a file made under another key."""
    key = load_key()
    key_id = _key_id(key)
    current = None if replace else _read_signatures(study_dir)
    if current is None or current.get("key_id") != key_id:
        current = {"key_id": key_id, "files": {}}
    signed = current["files"]
    for path in files:
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # replaced between listing and reading; the next save signs it
            continue
        digest = _digest(key, path.name, data)
        versions = [d for d in signed.get(path.name, []) if d != digest] + [digest]
        signed[path.name] = versions[-KEPT_VERSIONS:]
    from mttl.run_folder import atomic_write_text

    atomic_write_text(study_dir / SIGNATURES_FILE, json.dumps(current, indent=1, sort_keys=True) + "\n")


def verify_state(study_dir: Path) -> None:
    """CheckpointError (one line) unless every Tune state file in `study_dir` carries this user's signature."""
    files = state_files(study_dir)
    signatures = _read_signatures(study_dir)
    if signatures is None:
        names = ", ".join(p.name for p in files[:3]) or "its state"
        raise CheckpointError(f"sweep study '{study_dir}' holds Ray Tune state ({names}) without mttl's signatures "
                              f"({SIGNATURES_FILE} missing or unreadable), and restoring it would run the code its "
                              f"pickles carry; {TRUST_HINT}")
    key = load_key()
    if signatures.get("key_id") != _key_id(key):
        raise CheckpointError(f"sweep study '{study_dir}' was signed with another mttl key than yours ({key_path()}): "
                              f"it was saved on another machine or by another user; {TRUST_HINT}")
    for path in files:
        if _digest(key, path.name, path.read_bytes()) not in signatures["files"].get(path.name, []):
            raise CheckpointError(f"'{path}' is not a file mttl saved for this sweep (changed or added since), and "
                                  f"restoring the study would run the code it may carry; {TRUST_HINT}")


def adopt_state(study_dir: Path) -> None:
    """Sign the study's current state files as they are (the user chose to trust them)."""
    print(f"[mttl] trusting the Ray Tune state in {study_dir} as asked (trust_sweep_state=True); "
          f"signed it with your key {key_path()}")
    sign_files(study_dir, state_files(study_dir), replace=True)


class SignStateCallback(Callback):
    """Signs the state Tune has just saved into its staging folder, before Tune copies it into the study.

    Tune pickles this object into `tuner.pkl`: it holds nothing of a run (no key, no paths), only a
    reference to the live trial list, from which the study's storage is read when Tune saves."""

    def __init__(self):
        self._trials: list | None = None

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._trials = None

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        self._trials = trials  # Tune's own list: trials it adds later in this step are in it too

    def on_experiment_end(self, trials: list, **info) -> None:
        # after Tune's last save: the only signing chance of a restored study with nothing left to run
        self._trials = trials
        self.get_state()

    def get_state(self) -> None:
        if self._trials:
            storage = self._trials[0].storage
            staging = Path(storage.experiment_driver_staging_path)
            sign_files(Path(storage.experiment_fs_path), state_files(staging))
        return None  # stateless: Tune writes no callback state file for it


# ------------------------------------------------------------------------------------ restoring
def check_restorable(study_dir: Path, fresh_searcher: Callable[[], object]) -> None:
    """Read the study's experiment and searcher state the way Tune's resume does, on throwaway
    objects (`fresh_searcher()` makes the Optuna searcher a new study would get): where Tune
    itself fails to, it logs a traceback and starts the study over, or fails later on a half-set
    searcher."""
    from ray.tune.search import BasicVariantGenerator, SearchGenerator
    from ray.tune.utils.serialization import TuneFunctionDecoder

    try:
        states = sorted(study_dir.glob("experiment_state-*.json"))
        if states:
            state = json.loads(states[-1].read_text(encoding="utf-8"), cls=TuneFunctionDecoder,
                               allow_cloudpickle=True)
            if not isinstance(state, dict) or not isinstance(state.get("trial_data"), list):
                raise ValueError(f"{states[-1].name} holds no trial list")
        searcher = _quietly(fresh_searcher)
        for generator in (SearchGenerator(searcher), BasicVariantGenerator()):  # search=optuna, search=grid
            if generator.has_checkpoint(str(study_dir)):
                generator.restore_from_dir(str(study_dir))
                if isinstance(generator, SearchGenerator):
                    _check_searcher(searcher)
    except Exception as err:  # any failure here is a damaged state file, however Tune phrases it
        text = " ".join(str(err).split())[:200] or "no details"
        raise CheckpointError(f"the Ray Tune state in '{study_dir}' cannot be restored ({type(err).__name__}: "
                              f"{text}); move that folder away to run the study again from the start, or use "
                              f"a new run_name") from None


def _quietly(make: Callable[[], object]) -> object:
    """`make()` without Optuna's log line about the (throwaway) study it creates."""
    import optuna

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return make()
    finally:
        optuna.logging.set_verbosity(verbosity)


def _check_searcher(searcher) -> None:
    import optuna

    study = getattr(searcher, "_ot_study", None)
    if not isinstance(study, optuna.study.Study):
        raise ValueError(f"the saved searcher holds no Optuna study (got {type(study).__name__})")
    len(study.trials)  # what the resumed searcher reads first
