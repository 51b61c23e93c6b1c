"""Instrumented training for kill tests: the run reports its progress as numbered events on stdout.

Events (one line each, ``@@<n> <event>``): ``epoch <k>`` when epoch k starts, ``batch`` per training
batch, ``write <name>`` after each chunk written to a run file (config.yaml, metrics.json, log.csv,
last.pt, best.pt, model.pt, temporary or not) and ``replace <name>`` after a file is renamed into
place. Writes go out in small flushed chunks, so a kill after a ``write`` event leaves a file that is
really half-written. Nothing here changes a number the run computes.

With ``KILLABLE_PAUSE_AT=n`` the process stops after event n (and waits to be killed);
``KILLABLE_EVENT_SLEEP`` (seconds) slows every event down so that asynchronous kills spread out.

The child process runs::

    python -c "import killable; killable.install(); from mlpot.cli import train; import sys; train(sys.argv[1:])" ...

The in-process reference run calls ``install(emit=events.append, setattr=monkeypatch.setattr)``.
"""

import builtins
import io
import os
import pathlib
import sys
import time

TARGETS = ("config.yaml", "metrics.json", "log.csv", "last.pt", "best.pt", "model.pt")
CHUNK = {"config.yaml": 128, "metrics.json": 128}  # bytes per write; 1024 for the others


def target_of(path):
    """The run file a (possibly temporary) path stands for, or None."""
    name = os.path.basename(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else ""
    for target in TARGETS:
        if name.startswith(target):
            return target
    return None


def _child_emitter():
    pause_at = int(os.environ.get("KILLABLE_PAUSE_AT", "0"))
    sleep = float(os.environ.get("KILLABLE_EVENT_SLEEP", "0"))
    count = [0]

    def emit(event):
        count[0] += 1
        os.write(1, f"@@{count[0]} {event}\n".encode())
        if count[0] == pause_at:
            time.sleep(600)  # the test kills us here
        elif sleep:
            time.sleep(sleep)

    return emit


def _chunked_write(path, data: bytes, emit, target):
    size = CHUNK.get(target, 1024)
    with open(path, "wb") as fh:
        for start in range(0, len(data), size):
            fh.write(data[start : start + size])
            fh.flush()
            emit(f"write {target}")


def install(emit=None, setattr=builtins.setattr):
    """Route the run's file writes, renames, epochs and batches through ``emit``."""
    import torch

    import mlpot.train.loop as loop

    emit = emit or _child_emitter()
    torch_save, jit_save = torch.save, torch.jit.save
    write_text, write_bytes, replace = pathlib.Path.write_text, pathlib.Path.write_bytes, os.replace
    collate, tqdm = loop.collate, loop.tqdm

    def save(obj, f, *args, **kwargs):
        target = target_of(f)
        if target is None:
            return torch_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        torch_save(obj, buffer, *args, **kwargs)
        _chunked_write(f, buffer.getvalue(), emit, target)

    def save_script(module, f, _extra_files=None):
        target = target_of(f)
        if target is None:
            return jit_save(module, f, _extra_files=_extra_files)
        buffer = io.BytesIO()
        jit_save(module, buffer, _extra_files=_extra_files)
        _chunked_write(f, buffer.getvalue(), emit, target)

    def path_write_text(self, data, encoding=None, errors=None, newline=None):
        target = target_of(self)
        if target is None:
            return write_text(self, data, encoding=encoding, errors=errors, newline=newline)
        blob = data.encode(encoding or "utf-8", errors or "strict")
        _chunked_write(self, blob, emit, target)
        return len(data)

    def path_write_bytes(self, data):  # mlpot.files.write_bytes: checkpoints are serialised in memory first
        target = target_of(self)
        if target is None:
            return write_bytes(self, data)
        _chunked_write(self, bytes(data), emit, target)
        return len(data)

    def os_replace(src, dst, *args, **kwargs):
        replace(src, dst, *args, **kwargs)
        target = target_of(dst)
        if target is not None:
            emit(f"replace {target}")

    def batch(graphs):
        emit("batch")
        return collate(graphs)

    def progress(*args, **kwargs):
        emit(kwargs.get("desc", "epoch ?").split("/")[0])  # "epoch 3/6" -> "epoch 3"
        return tqdm(*args, **kwargs)

    setattr(torch, "save", save)
    setattr(torch.jit, "save", save_script)
    setattr(pathlib.Path, "write_text", path_write_text)
    setattr(pathlib.Path, "write_bytes", path_write_bytes)
    setattr(os, "replace", os_replace)
    setattr(loop, "collate", batch)
    setattr(loop, "tqdm", progress)


if __name__ == "__main__":  # python killable.py CONFIG ... runs mlpot-train instrumented
    install()
    from mlpot.cli import train

    train(sys.argv[1:])
