"""Checkpoint files you can trust: atomic writes with a content checksum, verified on every read.

A checkpoint is what ``torch.save`` writes (a zip archive), written to a temporary file in the *same directory*,
fsynced, then renamed over the target (``os.replace``, atomic within a filesystem): a kill at any moment leaves
the previous file or the new one, never a partial one. The SHA-256 of the archive is stored in the archive's
comment (the last bytes of the file), so the file stays a plain PyTorch checkpoint that ``torch.load`` reads, and
:func:`read_checkpoint` refuses one whose bytes changed after writing (bit rot, a partial copy, truncation).
Checkpoints written without the checksum are checked against the CRC-32 of each record of their zip archive.

No Lightning here: ``nets.loading`` (every loader of another model's checkpoint) and the Lightning plugin
(:class:`diffusion_pl.callbacks.VerifiedCheckpointIO`) both read and write through these functions.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import pickle
import secrets
import time
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from diffusion_pl.core.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointNotFoundError,
    WriteError,
)
from diffusion_pl.core.owner import Owner

log = logging.getLogger(__name__)

CHECKSUM_PREFIX = b"diffusion_pl sha256 "
_COMMENT_LEN = len(CHECKSUM_PREFIX) + 64
_EOCD = b"PK\x05\x06"  # zip "end of central directory" record: 22 bytes, its last 2 the comment length
_EOCD_LEN = 22
#: Temporary files of writes in progress: ``.ckpt-tmp.<pid>.<token>.<host>`` (no ``*.ckpt`` or ``hpc_ckpt_`` in
#: the name, so Lightning's searches for the last or the newest HPC checkpoint never pick one up).
TEMP_PREFIX = ".ckpt-tmp."
#: Temporary files of another host are removed once they are this old (their owner's liveness is unknown).
FOREIGN_TEMP_MAX_AGE_S = 24 * 3600
_CHUNK = 16 << 20


# ----------------------------------------------------------------------------------------------------- writing


def write_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> None:
    """Write ``checkpoint`` to ``path`` atomically, with its SHA-256 in the zip comment.

    Raises:
        WriteError: The write failed (e.g. a full disk); ``path`` is unchanged and no temporary file remains.
    """
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    view = buffer.getbuffer()
    if bytes(view[-_EOCD_LEN:-_EOCD_LEN + 4]) != _EOCD or bytes(view[-2:]) != b"\0\0":
        raise RuntimeError("torch.save wrote an archive without the plain zip end record this checksum needs")
    body, length = view[:-2], _COMMENT_LEN.to_bytes(2, "little")
    digest = hashlib.sha256(body)
    digest.update(length)
    write_atomically(path, (body, length, CHECKSUM_PREFIX + digest.hexdigest().encode()))


def write_atomically(path: str | Path, chunks: Iterable[bytes | memoryview], what: str = "checkpoint") -> None:
    """Write ``chunks`` to a temporary file beside ``path``, fsync it, rename it over ``path``, fsync the folder.

    Stale temporary files of killed writers in that folder are removed first.

    Args:
        path: The file to write.
        chunks: Its bytes.
        what: What the file is, for the error (e.g. "checkpoint", "predictions").

    Raises:
        WriteError: The write failed (a full disk, a read-only folder): ``path`` is unchanged, no temporary file
            remains, and the message says so and what to do.
    """
    path = Path(path)
    directory = path.parent
    me = Owner.current()
    temp = directory / f"{TEMP_PREFIX}{me.pid}.{secrets.token_hex(4)}.{me.host}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(directory)
        with open(temp, "xb") as handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            temp.unlink()
        if isinstance(error, OSError):
            raise WriteError(
                f"could not write {what} {path} ({error.strerror or error}); the previous file there is unchanged and "
                "no partial file is left. Free disk space (or fix the permissions, or choose another folder, e.g. "
                "--trainer.default_root_dir) and run again; a training run resumes from its last checkpoint") from error
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable (a crash right after it must not bring the old directory entry back)."""
    with contextlib.suppress(OSError):  # some filesystems do not open or sync directories
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_stale_temp_files(directory: str | Path) -> list[Path]:
    """Delete temporary checkpoint files left by killed writers: this host's whose process is gone, and other
    hosts' older than :data:`FOREIGN_TEMP_MAX_AGE_S`. Returns the removed paths."""
    removed = []
    for temp in Path(directory).glob(f"{TEMP_PREFIX}*"):
        pid, _, rest = temp.name[len(TEMP_PREFIX):].partition(".")
        host = rest.partition(".")[2]
        if not pid.isdigit():
            continue
        owner = Owner(host, int(pid))
        if owner.is_this_process:
            continue
        alive = owner.alive()
        with contextlib.suppress(OSError):
            if alive is False or (alive is None and time.time() - temp.stat().st_mtime > FOREIGN_TEMP_MAX_AGE_S):
                temp.unlink()
                removed.append(temp)
    if removed:
        log.info("removed %d temporary checkpoint file(s) of killed writes in %s", len(removed), directory)
    return removed


# ----------------------------------------------------------------------------------------------------- reading


class _Damage(Exception):
    """Why a checkpoint file is damaged, before the user's message (which offers the folder's good checkpoints) is
    made: checking those must not build messages of its own."""


def _checksum_state(path: str | Path) -> bool:
    """Check the SHA-256 that :func:`write_checkpoint` stored in a checkpoint file.

    Returns:
        True if the file carries the checksum and it matches; False if it carries none (written by plain
        Lightning/PyTorch or an older diffusion_pl, or cut off before its end).

    Raises:
        _Damage: The file's bytes differ from those written.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        handle.seek(max(0, size - 4 * (_COMMENT_LEN + _EOCD_LEN)))
        tail = handle.read()
        at = tail.rfind(_EOCD)
        marked = at >= 0 and tail[at + 20:at + 22] == _COMMENT_LEN.to_bytes(2, "little")
        if not marked:
            if CHECKSUM_PREFIX in tail:
                raise _Damage("its end is damaged (the end record before the checksum does not parse)")
            return False
        comment = tail[at + _EOCD_LEN:]
        if len(comment) != _COMMENT_LEN:
            raise _Damage(f"it is truncated (its checksum is {len(comment)} of {_COMMENT_LEN} bytes)"
                                if len(comment) < _COMMENT_LEN else "bytes were appended after its end")
        handle.seek(0)
        digest, remaining = hashlib.sha256(), size - _COMMENT_LEN
        while remaining > 0:
            chunk = handle.read(min(_CHUNK, remaining))
            if not chunk:
                break
            digest.update(chunk)
            remaining -= len(chunk)
    if comment != CHECKSUM_PREFIX + digest.hexdigest().encode():
        raise _Damage("its bytes differ from those written (the checksum stored in it does not match)")
    return True


def _file_state(path: str | Path) -> str:
    """Check a checkpoint file before loading it: the stored SHA-256, else (a checkpoint written without it) the
    CRC-32 of every record of its zip archive.

    Returns:
        "sha256", "zip-crc", or "unchecked" (not a complete zip archive: an old PyTorch format, or a damaged or
        truncated file, which ``torch.load`` then tells apart).

    Raises:
        _Damage: The bytes differ from those written.
    """
    if Path(path).stat().st_size == 0:
        raise _Damage("it is empty (0 bytes)")
    if _checksum_state(path):
        return "sha256"
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError):
        return "unchecked"
    if bad is not None:
        raise _Damage(f"its record {bad!r} fails the archive's CRC check (damaged after writing)")
    return "zip-crc"


def verify_checksum(path: str | Path) -> bool:
    """:func:`_checksum_state`, raising CheckpointCorruptError (naming the checkpoints to resume from) for damage."""
    try:
        return _checksum_state(path)
    except _Damage as damage:
        raise corrupt_error(path, str(damage)) from None


def verify_file(path: str | Path) -> str:
    """:func:`_file_state`, raising CheckpointCorruptError (naming the checkpoints to resume from) for damage."""
    try:
        return _file_state(path)
    except _Damage as damage:
        raise corrupt_error(path, str(damage)) from None


def read_checkpoint(path: str | Path, *, map_location: Any = "cpu", weights_only: bool = True,
                    mmap: bool = False) -> dict[str, Any]:
    """Verify a checkpoint file (:func:`verify_file`), then ``torch.load`` it (``mmap``: tensors memory-mapped, read
    from the file when used).

    Raises:
        CheckpointNotFoundError: No such file.
        CheckpointCorruptError: Checksum mismatch, or a file that does not load (truncated, damaged, not a
            checkpoint). The message lists the other checkpoints of its directory to resume from.
        CheckpointError: A verified file that torch refuses (e.g. objects that ``weights_only`` loading forbids).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint {path} not found{_others_hint(path) or ': check the path'}")
    check = verify_file(path)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=weights_only, mmap=mmap)
    except Exception as error:  # torch raises many types for damaged files
        first_line = (str(error).strip().splitlines() or [""])[0].split(". ")[0][:160]
        if check == "unchecked":  # not a complete zip archive, and not an old-format checkpoint either
            raise corrupt_error(path, "it does not load: it is truncated, damaged or not a checkpoint at all") \
                from error
        if isinstance(error, pickle.UnpicklingError) and "Weights only load failed" in str(error):
            raise CheckpointError(
                f"checkpoint {path} holds Python objects that safe loading refuses ({first_line}); loading them could "
                "run code. A diffusion_pl checkpoint holds only tensors and plain data: this file was written by "
                "other code") from error
        raise CheckpointError(f"checkpoint {path} cannot be loaded ({type(error).__name__}: {first_line})") \
            from error
    refuse_non_finite_weights(checkpoint, path)
    if check != "sha256":
        log.warning("checkpoint %s carries no checksum (written by plain Lightning or PyTorch, or an older "
                    "diffusion_pl): %s", path,
                    "its archive's CRCs match" if check == "zip-crc" else "loaded without verifying its bytes")
    return checkpoint


#: The checkpoint entries that hold weights: the saved (EMA, when averaging) ``state_dict``, and the raw weights
#: that Lightning's weight averaging keeps beside them.
WEIGHT_ENTRIES = ("state_dict", "current_model_state")


def non_finite_weights(checkpoint: Mapping[str, Any]) -> str | None:
    """None if every floating weight of the checkpoint is finite, else how many values of which tensors are not.

    The weights are those of :data:`WEIGHT_ENTRIES`, or the checkpoint itself when it is a plain state dict. One host
    sync per device: the per-tensor flags are reduced on their device before they are read.
    """
    entries = [entry for entry in WEIGHT_ENTRIES if isinstance(checkpoint.get(entry), Mapping)]
    named = [(f"{entry}/{name}", tensor) for entry in entries for name, tensor in checkpoint[entry].items()
             if isinstance(tensor, torch.Tensor) and tensor.is_floating_point()]
    if not entries:
        named = [(str(name), tensor) for name, tensor in checkpoint.items()
                 if isinstance(tensor, torch.Tensor) and tensor.is_floating_point()]
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for _, tensor in named:
        by_device.setdefault(tensor.device, []).append(torch.isfinite(tensor).all())
    if all(bool(torch.stack(flags).all()) for flags in by_device.values()):
        return None
    bad = [(name, tensor) for name, tensor in named if not bool(torch.isfinite(tensor).all())]
    count = sum(int((~torch.isfinite(tensor)).sum()) for _, tensor in bad)
    total = sum(tensor.numel() for _, tensor in bad)
    names = ", ".join(name for name, _ in bad[:3]) + (", ..." if len(bad) > 3 else "")
    return f"{count} of {total} values in {len(bad)} tensors: {names}"


def refuse_non_finite_weights(checkpoint: Any, source: str | Path) -> None:
    """Refuse a loaded checkpoint whose weights hold NaN or infinity (written by a diverged run of older code or
    another tool): sampling it gives blank images.

    Raises:
        CheckpointError: Naming the tensors and the checkpoints to use instead.
    """
    found = non_finite_weights(checkpoint) if isinstance(checkpoint, Mapping) else None
    if found is not None:
        raise CheckpointError(f"checkpoint {source} holds non-finite weights ({found}): the run that wrote it had "
                              f"diverged; use an earlier checkpoint{_others_hint(Path(str(source)))}")


def other_checkpoints(path: str | Path, limit: int = 8) -> list[Path]:
    """The other ``*.ckpt`` files in ``path``'s directory that verify (:func:`verify_file`), newest first, at most
    ``limit`` of them: what a damaged checkpoint's message may offer to resume from."""
    path = Path(path)
    try:
        found = sorted((p for p in path.parent.glob("*.ckpt") if p.is_file() and p.name != path.name),
                       key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        return []
    verified = []
    for candidate in found:
        with contextlib.suppress(_Damage, OSError):
            if _file_state(candidate) != "unchecked":
                verified.append(candidate)
        if len(verified) == limit:
            break
    return verified


def _others_hint(path: Path) -> str:
    others = other_checkpoints(path)
    if not others:
        return ""
    return f"; checkpoints in {path.parent}, newest first: {', '.join(p.name for p in others)}"


def corrupt_error(path: str | Path, reason: str) -> CheckpointCorruptError:
    """The error for a damaged checkpoint: names the file, and the previous checkpoint to resume from."""
    path = Path(path)
    others = other_checkpoints(path)
    message = f"checkpoint {path} is damaged: {reason}.\n"
    if others:
        names = ", ".join(p.name for p in others)
        message += (f"Resume from the previous checkpoint instead: --ckpt_path {others[0]}\n"
                    f"(checkpoints in {path.parent}, newest first: {names})")
    else:
        message += (f"There is no other checkpoint in {path.parent}: restore the file from a copy, or start the run "
                    "again")
    return CheckpointCorruptError(message)
