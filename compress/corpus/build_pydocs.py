"""Build the embedded ``pydocs`` prose corpus from the CPython documentation sources.

The corpus is real English prose taken from Python's own documentation (PSF
licence), as shipped by Debian in the ``python3.11-doc`` package (reST sources
under ``/usr/share/doc/python3.11/html/_sources``).  reST markup is turned into
plain readable prose: directives, code/literal blocks, doctest sessions, tables,
comments, targets and section adornments are dropped; roles and inline markup
are replaced by their visible text.  One document is produced per source file,
paragraphs joined by blank lines.

The output is deterministic (documents sorted by source path, gzip with
``mtime=0`` and no embedded file name)::

    python -m compress.corpus.build_pydocs --source /usr/share/doc/python3.11/html/_sources \
        --out compress/corpus

Only the standard library is used.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

DEFAULT_SOURCE = Path("/usr/share/doc/python3.11/html/_sources")
DEFAULT_OUT = Path(__file__).resolve().parent
PACKAGE = "python3.11-doc"

TRAIN_NAME = "pydocs-train.jsonl.gz"
EVAL_NAME = "pydocs-eval.jsonl.gz"
MANIFEST_NAME = "MANIFEST.json"

MIN_WORDS = 50            # documents shorter than this (after cleaning) are dropped
EVAL_FRACTION = 0.05      # target share of characters in the eval split
EVAL_MIN_CHARS = 150_000  # ... but at least this many characters
MAX_TRAIN_CHARS = 8_000_000  # cap for the train split (drop least prose-like docs first)

# Files that are not useful prose: licence boilerplate, table of contents pages,
# the (empty) changelog stub.  Paths are relative, without the ``.txt`` suffix.
EXCLUDE_FILES = {
    "license.rst",      # licence texts (shipped separately as LICENSE-PSF.txt)
    "copyright.rst",    # copyright boilerplate
    "contents.rst",     # toctree only
    "whatsnew/changelog.rst",  # generated from Misc/NEWS, empty in the sources
}
# Whole top-level folders that are excluded.  (Empty by default; see README.)
EXCLUDE_DIRS: set[str] = set()

# Sphinx substitutions that are defined in conf.py rather than in the documents.
GLOBAL_SUBS = {"version": "3.11", "release": "3.11", "today": "", "pepnum": ""}

# ----------------------------------------------------------------------------
# Directive classification
# ----------------------------------------------------------------------------
# Directives whose whole block (arguments, options and content) is dropped.
DROP_DIRECTIVES = {
    "code-block", "sourcecode", "code", "doctest", "testcode", "testsetup",
    "testcleanup", "testoutput", "productionlist", "literalinclude", "index",
    "toctree", "include", "highlight", "module", "currentmodule",
    "sectionauthor", "moduleauthor", "tabularcolumns", "list-table",
    "csv-table", "table", "parsed-literal", "raw", "image", "figure",
    "audit-event", "audit-event-table", "availability", "miscnews", "rubric",
    "contents", "limited-api-list", "epigraph", "highlightlang", "program",
    "autosummary", "math",
}
# Directives whose argument line is a signature/title (dropped) but whose
# content is prose (kept).
SIGNATURE_DIRECTIVES = {
    "function", "method", "class", "data", "attribute", "exception",
    "classmethod", "staticmethod", "abstractmethod", "decorator",
    "decoratormethod", "coroutinefunction", "coroutinemethod",
    "awaitablefunction", "awaitablemethod", "cmdoption", "option", "envvar",
    "opcode", "pdbcommand", "describe", "object", "topic", "sidebar", "only",
    "glossary", "c:function", "c:member", "c:type", "c:var", "c:macro",
    "c:struct", "c:data", "c:union", "c:enum", "c:enumerator",
    "py:function", "py:method", "py:class", "py:data", "py:attribute",
    "py:exception", "py:module",
}
# Admonitions: the text on the directive line is content (kept).
ADMONITIONS = {
    "note", "warning", "seealso", "important", "caution", "tip", "hint",
    "attention", "danger", "error", "admonition", "impl-detail",
}
VERSION_DIRECTIVES = {
    "versionadded": "New in version {v}",
    "versionchanged": "Changed in version {v}",
    "deprecated": "Deprecated since version {v}",
    "deprecated-removed": "Deprecated since version {v}, will be removed in version {r}",
}

# Bare "New in version 3.3." notes (a versionadded/versionchanged directive with
# no text) are formulaic and lose their context once signatures are dropped.
KEEP_BARE_VERSION_NOTES = False

# Field-list names that are document metadata (dropped).
META_FIELDS = {
    "author", "authors", "editor", "release", "date", "email", "version",
    "audience", "copyright", "platform", "synopsis", "tocdepth", "status",
    "type", "created", "python-version", "contact", "organization",
    "revision", "web site", "home page", "license",
}

RE_DIRECTIVE = re.compile(r"^\.\.\s+([A-Za-z][\w:.-]*)::(?:\s+(.*))?$")
RE_SUBST_DEF = re.compile(r"^\.\.\s+\|([^|]+)\|\s+([\w:-]+)::\s*(.*)$")
RE_TARGET = re.compile(r"^\.\.\s+_")
RE_FOOTNOTE = re.compile(r"^\.\.\s+\[([^\]]+)\]\s*(.*)$")
RE_OPTION = re.compile(r"^:[\w.-]+(?: [^:]+)?:(?:\s|$)")
RE_FIELD = re.compile(r"^:([A-Za-z][\w .-]*?):(?:\s+(.*))?$")
RE_ADORNMENT = re.compile(r"^([=\-~^\"'*+#_:.`<>])\1{2,}\s*$")
RE_GRID_BORDER = re.compile(r"^\+[-=+]+\+$")
RE_SIMPLE_TABLE = re.compile(r"^=+(?:\s+=+)+$")
RE_BULLET = re.compile(r"^([-*+\u2022])\s+(?=\S)")
RE_ENUM = re.compile(r"^(?:\d+[.)]|#\.|\(\d+\)|\([a-zA-Z]\)|[a-zA-Z][.)](?=\s))\s+(?=\S)")
RE_TITLE_REF = re.compile(r"^(.*?)\s*<([^<>]*)>$", re.S)

FUNC_ROLES = {"func", "meth", "c:func", "py:func", "py:meth", "cfunc"}


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


# ----------------------------------------------------------------------------
# Inline markup
# ----------------------------------------------------------------------------
RE_INLINE = re.compile(
    r"(?P<lit>``(?P<littext>.+?)``(?!`))"
    r"|(?P<role>:(?P<rname>[A-Za-z][\w:+.-]*):`(?P<rtext>(?:\\.|[^`\\])+?)`)"
    r"|(?P<ref>`(?P<reftext>(?:\\.|[^`\\])+?)`(?P<refsuf>__?|:[A-Za-z][\w:+.-]*:)?)"
    r"|(?P<fnref>\[(?:#[\w-]*|\d+|\*)\]_)"
    r"|(?P<sub>\|(?P<subname>\S(?:[^|]*?\S)?)\|(?:__?)?)"
    r"|(?P<strong>(?<![\w*])\*\*(?P<strongtext>\S(?:.*?\S)??)\*\*(?![\w*]))"
    r"|(?P<em>(?<![\w*\\])\*(?P<emtext>[^\s*](?:[^*]*?[^\s*\\])?)\*(?![\w*]))"
)
RE_ESCAPE = re.compile(r"\\(.)", re.S)


def _unescape(text: str) -> str:
    # "\ " is an escaped (i.e. removed) space, other escapes keep the char.
    return RE_ESCAPE.sub(lambda m: "" if m.group(1) in " \n" else m.group(1), text)


class Inline:
    """Renders reST inline markup into the text a reader would see."""

    def __init__(self, labels: dict[str, str]):
        self.labels = labels
        self.subs: dict[str, str] = {}

    def render(self, text: str) -> str:
        out = []
        pos = 0
        for m in RE_INLINE.finditer(text):
            out.append(_unescape(text[pos:m.start()]))
            out.append(self._piece(m))
            pos = m.end()
        out.append(_unescape(text[pos:]))
        return "".join(out)

    def _piece(self, m: re.Match) -> str:
        if m.group("lit"):
            return m.group("littext")
        if m.group("role"):
            return self._role(m.group("rname").lower(), m.group("rtext"))
        if m.group("ref"):
            suf = m.group("refsuf") or ""
            if suf.startswith(":"):
                return self._role(suf.strip(":").lower(), m.group("reftext"))
            body = _unescape(m.group("reftext"))
            t = RE_TITLE_REF.match(body)
            if t:
                return t.group(1) or t.group(2)
            return body
        if m.group("fnref"):
            return ""
        if m.group("sub"):
            name = m.group("subname")
            if name in self.subs:
                return self.subs[name]
            if name in GLOBAL_SUBS:
                return GLOBAL_SUBS[name]
            return m.group(0)  # not a substitution (e.g. "a|b|c")
        if m.group("strong"):
            return self.render(m.group("strongtext"))
        if m.group("em"):
            return self.render(m.group("emtext"))
        return m.group(0)

    def _role(self, role: str, raw: str) -> str:
        text = _unescape(raw)
        text = re.sub(r"\s+", " ", text)
        t = RE_TITLE_REF.match(text)
        if t and role not in ("samp", "math", "abbr", "kbd", "code", "regexp"):
            title, target = t.group(1), t.group(2)
            if title:
                return title
            text = target
        if role in ("pep", "rfc"):
            num = text.split("#")[0].strip()
            return f"{role.upper()} {num}"
        if role == "issue":
            return f"bpo-{text}"
        if role == "gh":
            return f"gh-{text}"
        if role == "samp":
            return re.sub(r"(?<!\\)[{}]", "", text)
        if role == "abbr":
            return re.sub(r"\s*\(.*\)\s*$", "", text, flags=re.S)
        if role == "menuselection":
            return text.replace("-->", "\u2192")
        if role in ("ref", "doc"):
            label = text.lower()
            if label in self.labels:
                return self.labels[label]
            return text.rsplit("/", 1)[-1].replace("-", " ")
        # Cross-reference roles: "!x" suppresses the link, "~a.b.c" shows "c".
        if text.startswith("!"):
            text = text[1:]
        if text.startswith("~"):
            text = text[1:]
            text = text.rsplit(".", 1)[-1]
        if role in FUNC_ROLES and not text.endswith(")"):
            text += "()"
        return text


# ----------------------------------------------------------------------------
# Block structure
# ----------------------------------------------------------------------------
class Paragraph:
    __slots__ = ("lines", "marker_indent", "body_indent", "is_item", "kind")

    def __init__(self, text: str, indent: int, body_indent: int, is_item: bool, kind: str = "text"):
        self.lines = [text]
        self.marker_indent = indent
        self.body_indent = body_indent
        self.is_item = is_item
        self.kind = kind


def extract_labels(text: str) -> dict[str, str]:
    """Map ``.. _label:`` targets that precede a section title to the title."""
    lines = text.expandtabs(8).splitlines()
    labels: dict[str, str] = {}
    pending: list[str] = []
    i = 0
    while i < len(lines):
        s = lines[i].strip()
        m = re.match(r"^\.\.\s+_([^:`]+|`[^`]+`):\s*$", s)
        if m:
            pending.append(m.group(1).strip("`").strip().lower())
            i += 1
            continue
        if not s:
            i += 1
            continue
        if pending:
            # optional overline
            j = i
            if RE_ADORNMENT.match(s) and j + 1 < len(lines):
                j += 1
            title = lines[j].strip()
            if (j + 1 < len(lines) and RE_ADORNMENT.match(lines[j + 1].strip())
                    and title and not RE_ADORNMENT.match(title)):
                for lab in pending:
                    labels[lab] = title
            pending = []
        i += 1
    return labels


class Cleaner:
    """Turns one reST document into a list of plain-text paragraphs.

    ``labels`` maps ``.. _label:`` targets (lower-case) to the raw text of the
    section title they point at, so that ``:ref:`label``` renders as the title.
    """

    def __init__(self, labels: dict[str, str]):
        plain = Inline({})  # titles contain markup; render them without :ref: lookups
        self.labels = {k: plain.render(v) for k, v in labels.items()}

    def clean(self, text: str) -> list[str]:
        lines = text.expandtabs(8).splitlines()
        # Per-document substitution definitions (".. |name| replace:: text").
        plain = Inline({})
        inline = Inline(self.labels)
        for ln in lines:
            m = RE_SUBST_DEF.match(ln.strip())
            if m and m.group(2) == "replace":
                inline.subs[m.group(1)] = plain.render(m.group(3))
        self.inline = inline

        paras: list[Paragraph] = []
        cur: Paragraph | None = None
        skip_indent: int | None = None   # skip blank lines and lines indented > this
        table_mode = None                # "grid" or "simple"
        pending_prefix: str | None = None
        pending_indent = 0

        def flush():
            nonlocal cur, skip_indent, pending_prefix
            if cur is None:
                return
            p = cur
            cur = None
            last = p.lines[-1].rstrip()
            if last.endswith("::"):
                # The next indented block is a literal block: skip it.
                skip_indent = p.body_indent
                if last == "::":
                    p.lines[-1] = ""
                elif last.endswith(" ::"):
                    p.lines[-1] = last[:-3]
                else:
                    p.lines[-1] = last[:-1]
            if p.kind == "doctest":
                return
            if pending_prefix is not None:
                # "Changed in version X:" heads the first paragraph of its content
                if p.marker_indent > pending_indent:
                    p.lines[0] = f"{pending_prefix} {p.lines[0]}"
                elif KEEP_BARE_VERSION_NOTES:
                    paras.append(Paragraph(pending_prefix[:-1] + ".", pending_indent, pending_indent, False))
                pending_prefix = None
            paras.append(p)

        n = len(lines)
        i = 0
        while i < n:
            line = lines[i].rstrip()
            s = line.strip()
            ind = _indent(line)

            if skip_indent is not None:
                if not s or ind > skip_indent:
                    i += 1
                    continue
                skip_indent = None

            if table_mode == "grid":
                if s:
                    i += 1
                    continue
                table_mode = None
            elif table_mode == "simple":
                if RE_SIMPLE_TABLE.match(s) and (i + 1 >= n or not lines[i + 1].strip()):
                    table_mode = None
                i += 1
                continue

            if not s:
                flush()
                i += 1
                continue

            # --- explicit markup: ".. something" ------------------------------
            if s == ".." or s.startswith(".. "):
                flush()
                m_sub = RE_SUBST_DEF.match(s)
                m_dir = RE_DIRECTIVE.match(s)
                m_fn = RE_FOOTNOTE.match(s)
                if m_sub or RE_TARGET.match(s):
                    skip_indent = ind
                    i += 1
                    continue
                if m_fn and not m_dir:
                    # footnote: keep its text
                    body = m_fn.group(2)
                    if body:
                        cur = Paragraph(body, ind, ind + 3, True)
                        # continuation lines are indented > ind
                    i += 1
                    continue
                if m_dir:
                    name = m_dir.group(1).lower()
                    arg = (m_dir.group(2) or "").strip()
                    if name in DROP_DIRECTIVES:
                        skip_indent = ind
                        i += 1
                        continue
                    # skip option lines and (for signatures) continuation lines
                    j = i + 1
                    arg_lines = [arg] if arg else []
                    while j < n:
                        t = lines[j].rstrip()
                        ts = t.strip()
                        if not ts or _indent(t) <= ind:
                            break
                        if RE_OPTION.match(ts):
                            j += 1
                            continue
                        if name in SIGNATURE_DIRECTIVES:
                            j += 1
                            continue
                        if name in VERSION_DIRECTIVES:
                            arg_lines.append(ts)
                            j += 1
                            continue
                        break
                    if name in VERSION_DIRECTIVES:
                        parts = " ".join(arg_lines).split(None, 2 if name == "deprecated-removed" else 1)
                        v = parts[0] if parts else ""
                        r = parts[1] if name == "deprecated-removed" and len(parts) > 1 else ""
                        rest = parts[-1] if len(parts) > (2 if name == "deprecated-removed" else 1) else ""
                        head = VERSION_DIRECTIVES[name].format(v=v, r=r)
                        # Is there indented content after a blank line?
                        k = j
                        while k < n and not lines[k].strip():
                            k += 1
                        has_content = k < n and _indent(lines[k]) > ind and k > j
                        if rest:
                            cur = Paragraph(f"{head}: {rest}", ind, ind, False)
                            flush()
                        elif has_content:
                            pending_prefix = head + ":"
                            pending_indent = ind
                        elif KEEP_BARE_VERSION_NOTES:
                            cur = Paragraph(head + ".", ind, ind, False)
                            flush()
                        i = j
                        continue
                    if name in ADMONITIONS and name != "admonition" and arg:
                        # text on the directive line is content
                        cur = Paragraph(arg, ind, ind + 3, True)
                        i = j
                        continue
                    # signature / container / unknown directive: drop the line,
                    # keep the content (processed normally).
                    i = j
                    continue
                # plain comment (possibly multi-line)
                skip_indent = ind
                i += 1
                continue

            # --- doctest (until the next blank line) ------------------------------------------------------
            if s.startswith(">>>"):
                if cur is None or cur.kind != "doctest":
                    flush()
                    cur = Paragraph(s, ind, ind, False, kind="doctest")
                i += 1
                continue
            if cur is not None and cur.kind == "doctest":
                i += 1
                continue

            # --- adornments, tables -------------------------------------------
            if RE_ADORNMENT.match(s):
                if cur is not None:
                    cur.kind = "title"
                flush()
                i += 1
                continue
            if RE_GRID_BORDER.match(s):
                flush()
                table_mode = "grid"
                i += 1
                continue
            if RE_SIMPLE_TABLE.match(s):
                flush()
                table_mode = "simple"
                i += 1
                continue
            if s.startswith("| ") or s == "|":
                # line blocks / stray table rows
                flush()
                i += 1
                continue

            # --- field lists (outside directive options) ----------------------
            m_field = RE_FIELD.match(s)
            if m_field and (cur is None or cur.is_item):
                flush()
                fname = m_field.group(1).strip()
                body = (m_field.group(2) or "").strip()
                if fname.lower() in META_FIELDS:
                    skip_indent = ind
                    i += 1
                    continue
                words = fname.split()
                if words and words[0].lower() in ("param", "parameter", "arg", "argument", "key", "keyword", "type"):
                    fname = words[-1]
                elif words and words[0].lower() == "raises":
                    fname = "Raises " + " ".join(words[1:])
                elif fname.lower() == "rtype":
                    fname = "Return type"
                elif fname.lower() in ("return", "returns"):
                    fname = "Returns"
                cur = Paragraph(f"{fname}: {body}" if body else f"{fname}:", ind, ind + 4, True)
                i += 1
                continue

            # --- list items ---------------------------------------------------
            m_item = RE_BULLET.match(s) or RE_ENUM.match(s)
            if m_item and (cur is None or ind < cur.body_indent):
                # (a "- x" line inside a paragraph is text, as in reST)
                flush()
                body = s[m_item.end():]
                if not RE_TARGET.match(body):
                    cur = Paragraph(body, ind, ind + m_item.end(), True)
                i += 1
                continue

            # --- ordinary text ------------------------------------------------
            if cur is not None:
                if cur.is_item and len(cur.lines) == 1 and ind > cur.marker_indent:
                    cur.body_indent = ind
                    cur.lines.append(s)
                    i += 1
                    continue
                if ind == cur.body_indent or (cur.is_item and ind > cur.marker_indent and ind >= cur.body_indent - 1):
                    cur.lines.append(s)
                    i += 1
                    continue
                flush()
                if skip_indent is not None:
                    continue  # re-examine this line under the literal-skip rule
            cur = Paragraph(s, ind, ind, False)
            i += 1
        flush()

        out = []
        for p in paras:
            txt = " ".join(x for x in p.lines if x)
            txt = self.inline.render(txt)
            txt = re.sub(r"\s+", " ", txt).strip()
            txt = txt.replace(" --- ", " \u2014 ")
            if not txt or not re.search(r"[A-Za-z]", txt):
                continue
            out.append(txt)
        return out


# ----------------------------------------------------------------------------
# Corpus assembly
# ----------------------------------------------------------------------------
def prose_score(paragraphs: list[str]) -> float:
    """Share of characters in sentence-like paragraphs (>= 6 words, ends in
    sentence punctuation)."""
    total = sum(len(p) for p in paragraphs) or 1
    good = sum(len(p) for p in paragraphs
               if len(p.split()) >= 6 and p.rstrip()[-1:] in ".:?!)\"'")
    return good / total


def split_key(rel: str) -> str:
    return hashlib.sha256(rel.encode("utf-8")).hexdigest()


def collect(source: Path) -> list[dict]:
    files = sorted(p for p in source.rglob("*.rst.txt"))
    texts = {}
    labels: dict[str, str] = {}
    for p in files:
        rel = p.relative_to(source).as_posix()[: -len(".txt")]
        t = p.read_text(encoding="utf-8")
        texts[rel] = t
        labels.update(extract_labels(t))
    cleaner = Cleaner(labels)
    docs = []
    for rel in sorted(texts):
        section = rel.split("/", 1)[0] if "/" in rel else "(root)"
        if rel in EXCLUDE_FILES or section in EXCLUDE_DIRS:
            continue
        paras = cleaner.clean(texts[rel])
        text = "\n\n".join(paras)
        words = len(text.split())
        if words < MIN_WORDS:
            continue
        docs.append({
            "source": rel, "section": section, "text": text, "words": words,
            "chars": len(text), "prose": prose_score(paras),
        })
    return docs


def split_docs(docs: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """Deterministic document-level split.

    Documents are ordered by sha256 of their relative path; the eval split takes
    documents in that order until it holds >= EVAL_FRACTION of all characters
    and >= EVAL_MIN_CHARS.  Train is then capped at MAX_TRAIN_CHARS by dropping
    the least prose-like documents first.
    """
    total = sum(d["chars"] for d in docs)
    target = max(EVAL_FRACTION * total, EVAL_MIN_CHARS)
    ordered = sorted(docs, key=lambda d: split_key(d["source"]))
    eval_docs, train_docs = [], []
    acc = 0
    for d in ordered:
        if acc < target and d["chars"] <= 0.5 * target:
            eval_docs.append(d)
            acc += d["chars"]
        else:
            train_docs.append(d)
    dropped = []
    train_chars = sum(d["chars"] for d in train_docs)
    if train_chars > MAX_TRAIN_CHARS:
        for d in sorted(train_docs, key=lambda d: (d["prose"], d["source"])):
            if train_chars <= MAX_TRAIN_CHARS:
                break
            dropped.append(d)
            train_chars -= d["chars"]
        gone = {d["source"] for d in dropped}
        train_docs = [d for d in train_docs if d["source"] not in gone]
    key = lambda d: d["source"]
    return sorted(train_docs, key=key), sorted(eval_docs, key=key), sorted(dropped, key=key)


def write_jsonl_gz(path: Path, docs: list[dict]) -> bytes:
    raw = "".join(
        json.dumps({"text": d["text"], "source": d["source"]}, ensure_ascii=False) + "\n"
        for d in docs
    ).encode("utf-8")
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(raw)
    path.write_bytes(buf.getvalue())
    return raw


def package_version() -> str:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", PACKAGE],
                             capture_output=True, text=True, check=True).stdout.strip()
        return out or "unknown"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def split_stats(docs: list[dict]) -> dict:
    by_section: dict[str, dict] = {}
    for d in docs:
        s = by_section.setdefault(d["section"], {"docs": 0, "chars": 0, "words": 0})
        s["docs"] += 1
        s["chars"] += d["chars"]
        s["words"] += d["words"]
    return {
        "docs": len(docs),
        "chars": sum(d["chars"] for d in docs),
        "words": sum(d["words"] for d in docs),
        "by_section": dict(sorted(by_section.items())),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE,
                    help=f"directory of *.rst.txt sources (default: {DEFAULT_SOURCE})")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help="output directory (default: this package folder)")
    ap.add_argument("--package-version", default=None,
                    help=f"version of {PACKAGE} to record (default: ask dpkg-query)")
    args = ap.parse_args(argv)

    if not args.source.is_dir():
        ap.error(f"source directory not found: {args.source} "
                 f"(apt-get install {PACKAGE})")
    args.out.mkdir(parents=True, exist_ok=True)

    docs = collect(args.source)
    train, evald, dropped = split_docs(docs)

    files = {}
    for name, part in ((TRAIN_NAME, train), (EVAL_NAME, evald)):
        raw = write_jsonl_gz(args.out / name, part)
        data = (args.out / name).read_bytes()
        files[name] = {
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "uncompressed_bytes": len(raw),
            "uncompressed_sha256": hashlib.sha256(raw).hexdigest(),
        }

    cmd_args = sys.argv[1:] if argv is None else list(argv)
    manifest = {
        "name": "pydocs",
        "description": "English prose from the Python 3.11 documentation (reST sources "
                       "converted to plain text; code, directives and tables removed).",
        "source_package": PACKAGE,
        "source_package_version": args.package_version or package_version(),
        "source_dir": str(args.source),
        "license": "PSF License Version 2 (see LICENSE-PSF.txt)",
        "format": "gzip JSON lines: {\"text\": str, \"source\": str}; paragraphs separated by a blank line",
        "command": " ".join(["python", "-m", "compress.corpus.build_pydocs", *cmd_args]),
        "settings": {
            "min_words": MIN_WORDS, "eval_fraction": EVAL_FRACTION,
            "eval_min_chars": EVAL_MIN_CHARS, "max_train_chars": MAX_TRAIN_CHARS,
            "split": "eval = docs in sha256(source) order until >= max(eval_fraction*chars, eval_min_chars); "
                     "docs larger than half that target go to train",
            "excluded_files": sorted(EXCLUDE_FILES),
            "excluded_dirs": sorted(EXCLUDE_DIRS),
        },
        "splits": {
            "train": {"file": TRAIN_NAME, **split_stats(train)},
            "eval": {"file": EVAL_NAME, **split_stats(evald)},
        },
        "dropped_for_size": [d["source"] for d in dropped],
        "files": files,
    }
    (args.out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n",
                                          encoding="utf-8")
    for split in ("train", "eval"):
        st = manifest["splits"][split]
        print(f"{split}: {st['docs']} docs, {st['chars']:,} chars, {st['words']:,} words, "
              f"{files[st['file']]['bytes']:,} bytes gz")
    if dropped:
        print(f"dropped for size: {len(dropped)} docs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
