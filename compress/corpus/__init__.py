"""Built-in text corpora shipped with ``compress`` (no network needed).

``pydocs`` is English prose from the Python 3.11 documentation (PSF License
Version 2, see ``LICENSE-PSF.txt``), converted from reST to plain text by
:mod:`compress.corpus.build_pydocs` and split by document into a training and
a held-out evaluation set.  Each split is a gzip-compressed JSON-lines file, one
document per line: ``{"text": "...", "source": "library/os.rst"}`` with
paragraphs separated by a blank line.  Read it with::

    import gzip, json
    from compress.corpus import builtin_path

    with gzip.open(builtin_path("pydocs/train"), "rt", encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]

This module only uses the standard library.
"""
from __future__ import annotations

import pathlib

__all__ = ["CORPUS_DIR", "BUILTIN_SPLITS", "builtin_path"]

#: Folder holding the built-in corpus files.
CORPUS_DIR: pathlib.Path = pathlib.Path(__file__).resolve().parent

#: Name of each built-in split -> path of its ``.jsonl.gz`` file.
BUILTIN_SPLITS: dict[str, pathlib.Path] = {
    "pydocs/train": CORPUS_DIR / "pydocs-train.jsonl.gz",
    "pydocs/eval": CORPUS_DIR / "pydocs-eval.jsonl.gz",
    # A far domain for held-out evaluation only: the licence texts of Debian's /usr/share/common-licenses
    # (legal English; each licence permits verbatim copies of its own text).
    "licenses/eval": CORPUS_DIR / "licenses-eval.jsonl.gz",
}


def builtin_path(name: str) -> pathlib.Path:
    """Return the path of the built-in split ``name`` (e.g. ``"pydocs/train"``).

    Raises ``ValueError`` (not ``KeyError``) naming the unknown split and listing
    the available ones.
    """
    try:
        return BUILTIN_SPLITS[name]
    except (KeyError, TypeError):
        known = ", ".join(sorted(BUILTIN_SPLITS))
        raise ValueError(f"unknown built-in corpus {name!r}; available: {known}") from None
