"""The saved-model folder: safetensors weights + a small JSON, written atomically.

A saved model is a folder with ``model.safetensors`` (the state dict; tensors that share
storage, e.g. tied embeddings, are written once and listed as aliases in the JSON),
``osscar_pruned.json`` (``{"format": ..., "family": ..., "aliases": {...}, "files": [...], ...}``
plus the family's own description) and family files (``config.json`` for transformers models).
``"files"`` names every top-level file and folder the save wrote. Nothing is pickled.

Writing (:func:`write_folder`):

* **Only this tool's files are replaced.** :func:`check_destination` (called by the CLI and
  ``oneshot`` before pruning, by :func:`write_folder` before writing anything, and again just before
  the swap) refuses a destination that holds anything its ``"files"`` list does not name (a model
  saved before that list existed: anything outside :data:`KNOWN_FILES` and the module folders its
  ``modules.json`` lists), so a user's own files there are never deleted.
* **The swap.** The new model is written into a hidden ``.NAME.PID-XXXXXXXX.tmp`` folder next to
  the destination, its modes set from the umask (folders ``0o777 & ~umask``, files
  ``0o666 & ~umask``; ``mkdtemp`` made it ``0o700``), and then put in place:

  - no destination yet: one ``rename`` (atomic);
  - on Linux (``renameat2(RENAME_EXCHANGE)``, ext4 / xfs / btrfs / tmpfs...): the temporary folder
    and the destination are exchanged in one atomic system call, and the temporary name, which now
    holds the old model, is deleted. At every instant the destination is a complete model, old or
    new, even if the process is killed;
  - elsewhere (no ``renameat2``, or a file system without the flag): the old folder is renamed to
    ``.NAME.old-PID``, the new one onto the destination, then the old one deleted; if the second
    rename fails the old folder is renamed back before the error propagates. Only a kill between
    the two renames leaves the destination missing (the old model then sits in ``.NAME.old-PID``).

* **Left-overs.** A killed save can leave ``.NAME.[PID-]XXXXXXXX.tmp`` and ``.NAME.old-PID``
  folders next to the destination; the next save to that destination deletes them (exactly these
  patterns; not those of a process that is still running).

Reading (:func:`read_meta`, :func:`read_state_dict`, :func:`check_aliases_tied`) trusts nothing in
the folder: non-finite weights, aliases that name a saved tensor, a missing source, or tensors that
the rebuilt model does not tie, are ValueErrors naming ``directory`` and the file.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT = "osscar_opt.pruned_model"
META_FILE = "osscar_pruned.json"
WEIGHTS_FILE = "model.safetensors"
KNOWN_FILES = frozenset({
    # the folder itself and the transformers family
    WEIGHTS_FILE, META_FILE, "config.json", "generation_config.json",
    # tokenizers (save_pretrained)
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
    "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "chat_template.jinja", "chat_template.json",
    # sentence-transformers (module folders: see _owned_names)
    "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
})
"""What a save writes by name: the whole content of a folder saved before ``"files"`` was recorded."""


def _storage_key(tensor: torch.Tensor) -> tuple:
    """What makes two tensors the same tied weight: storage, offset, shape, strides and dtype."""
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride(),
            tensor.dtype)


def split_aliases(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that share storage with an earlier one; return the rest (CPU) and alias -> source."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, tensor in state.items():
        identity = _storage_key(tensor)
        if tensor.numel() and identity in seen:
            aliases[key] = seen[identity]
            continue
        seen[identity] = key
        unique[key] = tensor.detach().to("cpu").contiguous()
    return unique, aliases


# ---------------------------------------------------------------------- the destination
def _owned_names(directory: Path, document: Mapping[str, Any]) -> set[str]:
    """Top-level names a saved model's folder may hold: its ``"files"`` list, or for a model saved
    before that list existed, :data:`KNOWN_FILES` and the module folders of its ``modules.json``."""
    files = document.get("files")
    if isinstance(files, list) and all(isinstance(name, str) for name in files):
        return set(files)
    owned = set(KNOWN_FILES)
    modules_path = directory / "modules.json"
    if modules_path.is_file():
        try:
            modules = json.loads(modules_path.read_text())
        except (OSError, ValueError):
            modules = []
        for module in modules if isinstance(modules, list) else []:
            path = module.get("path") if isinstance(module, dict) else None
            if isinstance(path, str) and path.strip("/"):
                owned.add(Path(path).parts[0])
    return owned


def check_destination(directory: Path) -> None:
    """Refuse to write over a file, over a folder that is not a saved model, or over a saved model's
    folder that holds entries the save did not write (they would be deleted with it)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"directory: {directory} exists and is not a folder")
    if not directory.is_dir():
        return
    entries = sorted(entry.name for entry in directory.iterdir())
    if not entries:
        return
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise ValueError(
            f"directory: {directory} is a non-empty folder that is not a saved pruned model (no {META_FILE}); "
            "choose an empty or new folder"
        )
    document = read_json(meta_path)
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ValueError(f"directory: {meta_path} is not an osscar_opt pruned model description; not replacing "
                         f"{directory}")
    foreign = [name for name in entries if name not in _owned_names(directory, document)]
    if foreign:
        shown = ", ".join(foreign[:10]) + (f" and {len(foreign) - 10} more" if len(foreign) > 10 else "")
        raise ValueError(
            f"directory: {directory} holds a saved model and entries it did not write ({shown}; see \"files\" in "
            f"{meta_path}); saving there would delete them: move them away or choose another folder"
        )


def _leftover_pid(directory: Path, name: str) -> tuple[bool, int | None]:
    """Whether ``name`` (next to ``directory``) is a temporary or set-aside folder of a save to
    ``directory``, and the process id in its name (None when it has none)."""
    stem = re.escape(directory.name)
    temporary = re.fullmatch(rf"\.{stem}\.(?:(\d+)-)?[a-z0-9_]{{8}}\.tmp", name)
    if temporary:
        return True, int(temporary.group(1)) if temporary.group(1) else None
    aside = re.fullmatch(rf"\.{stem}\.old-(\d+)", name)
    if aside:
        return True, int(aside.group(1))
    return False, None


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return False  # an earlier save of this process: it is over
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: exists, someone else's
        return True
    return True


def remove_leftovers(directory: Path) -> list[Path]:
    """Delete the hidden ``.NAME.[PID-]XXXXXXXX.tmp`` / ``.NAME.old-PID`` folders that killed saves to
    ``directory`` left next to it (not those of a process still running); the deleted paths."""
    removed = []
    if not directory.parent.is_dir():
        return removed
    for entry in directory.parent.iterdir():
        matches, pid = _leftover_pid(directory, entry.name)
        if not matches or entry.is_symlink() or not entry.is_dir() or (pid is not None and _running(pid)):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


# ---------------------------------------------------------------------- writing
def _umask() -> int:
    """The process umask, read without changing it where /proc says it (Linux), else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0)
    os.umask(old)
    return old


def _set_modes(folder: Path) -> None:
    """Folders ``0o777 & ~umask``, files ``0o666 & ~umask`` (as if created with ``mkdir`` / ``open``)."""
    umask = _umask()
    folder_mode, file_mode = 0o777 & ~umask, 0o666 & ~umask
    for root, folders, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, file_mode)
        for name in folders:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, folder_mode)
    os.chmod(folder, folder_mode)


def write_folder(
    directory: Path,
    state: dict[str, torch.Tensor],
    meta: dict[str, Any],
    write_files: Callable[[Path], None],
) -> Path:
    """Write weights, ``meta`` (JSON) and whatever ``write_files(folder)`` writes, atomically (see the
    module docstring); an earlier saved model at ``directory`` is replaced, anything else refused."""
    from safetensors.torch import save_file

    directory = Path(directory)
    check_destination(directory)
    target = directory.resolve() if directory.is_symlink() else directory  # a link stays, its target is replaced
    tensors, aliases = split_aliases(state)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(target)
    temporary = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}-", suffix=".tmp", dir=target.parent))
    try:
        save_file(tensors, str(temporary / WEIGHTS_FILE), metadata={"format": FORMAT})
        write_files(temporary)
        files = sorted({entry.name for entry in temporary.iterdir()} | {META_FILE})
        document = {"format": FORMAT, "aliases": aliases, **meta, "files": files}
        (temporary / META_FILE).write_text(json.dumps(document, indent=1, sort_keys=True))
        _set_modes(temporary)
        check_destination(target)  # entries put there while this save ran are not deleted either
        _replace_folder(temporary, target)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
    return directory


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths in one atomic ``renameat2(RENAME_EXCHANGE)``; False (nothing done)
    where the C library or the file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, f"cannot exchange {first} and {second}: {os.strerror(code)}")


def _remove(path: Path) -> None:
    """Delete a replaced model folder (best effort: a later save removes what is left)."""
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def _replace_folder(source: Path, destination: Path) -> None:
    """Move ``source`` to ``destination``; an existing saved model there is replaced such that the
    destination holds the old or the new model at every instant (see the module docstring)."""
    if not os.path.lexists(destination):
        os.replace(source, destination)
        return
    if _exchange(source, destination):
        _remove(source)  # the temporary name now holds the old model
        return
    old = destination.with_name(f".{destination.name}.old-{os.getpid()}")
    if os.path.lexists(old):
        _remove(old)
    os.replace(destination, old)
    try:
        os.replace(source, destination)
    except BaseException:
        os.replace(old, destination)  # put the old model back before the error propagates
        raise
    _remove(old)


def read_json(path: Path) -> Any:
    """The JSON document in ``path``; invalid JSON is a ValueError naming the file."""
    try:
        return json.loads(path.read_text())
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"directory: {path} is not valid JSON ({exc})") from exc


def read_meta(directory: str | os.PathLike, families: tuple[str, ...]) -> dict[str, Any]:
    """The JSON document of a saved model; a missing or foreign folder raises ValueError."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise ValueError(f"directory: {directory} is not a saved pruned model (no {META_FILE})")
    document = read_json(path)
    if not isinstance(document, dict) or document.get("format") != FORMAT or document.get("family") not in families:
        raise ValueError(f"directory: {path} is not an osscar_opt pruned model description")
    return document


def _aliases(directory: Path, meta: Mapping[str, Any]) -> dict[str, str]:
    """``meta["aliases"]`` (alias key -> source key), checked to be a mapping of names."""
    aliases = meta.get("aliases", {})
    if not isinstance(aliases, Mapping) or not all(
        isinstance(alias, str) and isinstance(source, str) for alias, source in aliases.items()
    ):
        raise ValueError(f"directory: {directory / META_FILE} has an 'aliases' entry that is not a mapping of "
                         "tensor names")
    return dict(aliases)


def _check_finite(path: Path, state: Mapping[str, torch.Tensor], chunk: int = 1 << 24) -> None:
    """Refuse NaN / infinite values (checked in chunks: no copy of a whole tensor)."""
    for key, tensor in state.items():
        if not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        flat = tensor.reshape(-1)
        for start in range(0, flat.numel(), chunk):
            if not bool(torch.isfinite(flat[start:start + chunk]).all()):
                raise ValueError(f"directory: {path} holds non-finite values (NaN or infinity) in {key!r}")


def read_state_dict(directory: str | os.PathLike, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The saved state dict with tied aliases restored (CPU tensors).

    Non-finite values, and aliases (``meta["aliases"]``: tied weights written once) whose key is a
    saved tensor or whose source is not, are ValueErrors naming the file; whether the rebuilt model
    really ties each alias to its source is :func:`check_aliases_tied`'s to check.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise ValueError(f"directory: no {WEIGHTS_FILE} in {directory}")
    aliases = _aliases(directory, meta)
    try:
        state = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
        raise ValueError(f"directory: {path} is not a readable safetensors file ({exc})") from exc
    _check_finite(path, state)
    for alias, source in aliases.items():
        if alias in state:
            raise ValueError(f"directory: {directory / META_FILE} lists {alias!r} as a tied weight (an alias of "
                             f"{source!r}), but {path} holds a tensor of that name")
        if source not in state:
            raise ValueError(f"directory: {path} lacks {source!r}, the source of the tied weight {alias!r} "
                             f"({directory / META_FILE})")
    for alias, source in aliases.items():
        state[alias] = state[source]
    return state


def check_aliases_tied(model: nn.Module, directory: str | os.PathLike, meta: Mapping[str, Any]) -> None:
    """Refuse a rebuilt ``model`` in which an alias of the saved JSON (a weight written once because it
    was tied to its source) is not the same tensor as its source: the JSON was edited to load one
    layer's weights into another."""
    directory = Path(directory)
    state = model.state_dict(keep_vars=True)
    for alias, source in _aliases(directory, meta).items():
        if alias not in state or source not in state or _storage_key(state[alias]) != _storage_key(state[source]):
            raise ValueError(
                f"directory: {directory / META_FILE} lists {alias!r} as tied to {source!r}, but the rebuilt "
                f"{type(model).__name__} does not tie them; refusing to load {source!r}'s values into {alias!r}"
            )
