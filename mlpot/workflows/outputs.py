"""The output folder of a workflow: never overwritten without ``overwrite``, resumed only with the same options."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

from mlpot.files import TMP_SUFFIX, write_json

OPTIONS_FILE = "run.json"  # the options a run was started with; a resume must give the same ones


@contextlib.contextmanager
def output_folder(out, state_file: str, resume: bool, overwrite: bool, options: dict) -> Iterator[Path]:
    """Yields the folder a workflow writes its results into.

    A new run needs ``out`` to hold no results of an earlier run (marked by its ``run.json``; other files,
    such as the inputs, may be there). ``resume`` continues the run whose ``state_file`` is in ``out``
    (started with the same ``options``). ``overwrite`` replaces the results in ``out``: the new run writes
    into a sibling folder whose files replace those of the same names in ``out`` only once it has finished,
    so a run that fails (a full disk, a kill) leaves the previous results as they were.

    Raises:
        ValueError: ``out`` holds results and neither ``resume`` nor ``overwrite`` is given, there is
            nothing to resume, or the resumed run was started with other options.
    """
    out = Path(out)
    options = json.loads(json.dumps(options, default=str))
    if resume and overwrite:
        raise ValueError("--resume continues the run in the output folder and --overwrite replaces it; give one of them")
    if resume:
        if not (out / state_file).is_file():
            raise ValueError(f"{out}: no run to resume there (no {state_file}); start it without --resume")
        _check_options(out, options)
        for leftover in out.glob(f"*{TMP_SUFFIX}"):  # half-written files of the killed run, never renamed into place
            leftover.unlink()
        yield out
        return
    if (out / OPTIONS_FILE).exists() or (out / state_file).exists():
        if not overwrite:
            raise ValueError(f"the output folder {out} already holds results; pass --overwrite to replace them, "
                             f"--resume to continue its run, or choose another --output")
        staging = out.parent / f".{out.name}.overwrite"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            write_json(staging / OPTIONS_FILE, options)
            yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        (out / state_file).unlink(missing_ok=True)  # the old run is no longer resumable
        for entry in sorted(staging.iterdir(), key=lambda p: p.name == OPTIONS_FILE):  # run.json last
            target = out / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(entry, target)
        staging.rmdir()
        return
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {out} is a file, not a folder; choose a folder")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / OPTIONS_FILE, options)
    yield out


def _check_options(out: Path, options: dict) -> None:
    path = out / OPTIONS_FILE
    saved = json.loads(path.read_text()) if path.is_file() else options
    changed = sorted(k for k in set(saved) | set(options) if saved.get(k) != options.get(k))
    if changed:
        listed = ", ".join(f"{k} {saved.get(k)!r} (now {options.get(k)!r})" for k in changed)
        raise ValueError(f"{out}: the run was started with {listed}; resume it with the same options")
