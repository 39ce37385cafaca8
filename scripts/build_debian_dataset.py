#!/usr/bin/env python3
"""Build the embedded ``builtin://debian-packages`` text-classification dataset.

Reads a Debian APT ``Packages`` index (the output of ``apt-cache dumpavail``, or the
``dists/<suite>/main/binary-<arch>/Packages`` file of a mirror) and writes
``train``/``valid``/``test``/``unlabeled`` JSON-lines files (gzip, mtime 0), ``labels.json``
and ``README.md`` into the dataset folder.

Text is each package's long description: the synopsis line, then the extended description
with the Debian control-file formatting undone. Since Debian 6, ``Packages`` files carry only
the synopsis plus ``Description-md5``; the extended text lives in ``i18n/Translation-en``.
Pass that file with ``--translations`` (it is joined on ``Description-md5``). A ``Packages``
stream whose ``Description``/``Description-en`` fields already hold the full text (for
example ``apt-cache show`` output) needs no translations file.

Inputs may be plain, ``.gz``, ``.xz`` or ``.bz2`` (chosen by file name). APT keeps its lists
lz4-compressed; decompress them with ``/usr/lib/apt/apt-helper cat-file FILE``.

The output depends only on the inputs and the options (fixed seed, sorted iteration, gzip
mtime 0, compresslevel 9), so the same inputs rebuild the folder byte for byte.

Example (the shipped dataset; Debian 12.15 "bookworm", main, amd64)::

    apt-get update -o Acquire::Languages=en
    L=/var/lib/apt/lists/deb.debian.org_debian_dists_bookworm_main
    /usr/lib/apt/apt-helper cat-file ${L}_binary-amd64_Packages.lz4 > Packages
    /usr/lib/apt/apt-helper cat-file ${L}_i18n_Translation-en.lz4 > Translation-en
    python scripts/build_debian_dataset.py Packages --translations Translation-en \\
        --release '12.15 "bookworm"' --date 2026-07-11 --baseline

``apt-cache dumpavail | python scripts/build_debian_dataset.py - --translations FILE`` works
too (``-`` or no path = stdin). Only the standard library is needed to build; ``--baseline``
(a multinomial naive Bayes sanity check, printed and added to README.md) also needs numpy.
"""

from __future__ import annotations

import argparse
import bz2
import collections
import gzip
import hashlib
import io
import itertools
import json
import lzma
import random
import re
import statistics
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "trainer" / "ulmfit_trainer" / "datasets" / "debian_packages"

# Sections kept as classes. Chosen for being topical (not "which language binding is this",
# which a single keyword gives away), clearly distinguishable by a human from the text
# alone, and large enough after deduplication (>= ~600 distinct source packages each).
DEFAULT_LABELS = ("admin", "devel", "games", "net", "science", "sound", "utils", "x11")

# What each Debian section holds (paraphrased), for README.md and as label verbalizers.
SECTION_MEANING = {
    "admin": "system administration: users, services, backups, system resources",
    "devel": "software development: compilers, debuggers, build tools, IDEs",
    "games": "games and their data",
    "net": "networking: daemons, clients and tools for network protocols",
    "science": "scientific computing, data analysis and domain science tools",
    "sound": "audio: players, editors, synthesizers, plugins, codecs",
    "utils": "general utilities: files, disks, archives, monitoring, shell tools",
    "x11": "the X Window System: window managers, desktop components, X applications",
}

MIN_WORDS = 15
NEAR_DUP_JACCARD = 0.6
SHINGLE = 3


# --------------------------------------------------------------------------- parsing


def read_input(path: str) -> tuple[str, str]:
    """Read a (possibly compressed) text file, ``-`` = stdin; return (text, sha256 of bytes)."""
    if path == "-":
        data = sys.stdin.buffer.read()
    else:
        opener = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}.get(Path(path).suffix, open)
        with opener(path, "rb") as fh:  # type: ignore[operator]
            data = fh.read()
    return data.decode("utf-8", errors="replace"), hashlib.sha256(data).hexdigest()


def parse_stanzas(stream: Iterable[str]) -> Iterator[dict[str, str]]:
    """Yield deb822 stanzas as ``{field: value}``; continuation lines keep their newline."""
    fields: dict[str, str] = {}
    key = None
    for raw in stream:
        line = raw.rstrip("\r\n")
        if not line.strip():
            if fields:
                yield fields
            fields, key = {}, None
        elif line[0] in " \t":
            if key is not None:
                fields[key] += "\n" + line
        elif ":" in line:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    if fields:
        yield fields


_BULLET = re.compile(r"^(?:[*+o\-]|\d+[.)])\s")


def format_description(raw: str) -> str:
    """Undo Debian description formatting.

    The first line is the synopsis. In the extended part each line loses its leading space,
    a line `` .`` separates paragraphs (output as a newline), and wrapped lines are joined by
    a space. A line starting with a list bullet begins a new output line, and so does a
    verbatim line (two or more leading spaces), unless it is indented deeper than the list
    item it follows (then it continues that item). Runs of whitespace become one space.
    """
    lines = raw.split("\n")
    out = [" ".join(lines[0].split())]
    current: list[str] = []
    cur_indent = 0  # indentation of the line that started `current`
    cur_item = False  # whether `current` is a list item
    cur_verbatim = False  # whether `current` started with a verbatim line

    def flush() -> None:
        if current:
            out.append(" ".join(current))
            current.clear()

    for line in lines[1:]:
        line = line.expandtabs(8)
        body = line[1:] if line.startswith(" ") else line
        if body.strip() == ".":
            flush()
            continue
        text = " ".join(body.split())
        if not text:
            continue
        indent = len(line) - len(line.lstrip(" "))
        item = bool(_BULLET.match(text))
        if item:
            new = True
        elif indent >= 2:
            new = not (cur_item and indent > cur_indent)
        else:
            new = cur_verbatim and not cur_item
        if new or not current:
            flush()
            cur_indent, cur_item, cur_verbatim = indent, item, indent >= 2
        current.append(text)
    flush()
    return "\n".join(s for s in out if s)


# ------------------------------------------------------------------------ selection


@dataclass
class Entry:
    package: str
    source: str
    section: str
    text: str

    @property
    def words(self) -> int:
        return len(self.text.split())


def load_entries(
    packages: str, translations: str | None
) -> tuple[list[Entry], dict[str, int], dict[str, str]]:
    """Join packages with their long descriptions; return one entry per package name,
    counters, and the SHA-256 of each input (uncompressed bytes)."""
    stats: collections.Counter[str] = collections.Counter()
    sha: dict[str, str] = {}
    long_desc: dict[str, str] = {}
    if translations:
        text, sha["Translation-en"] = read_input(translations)
        for st in parse_stanzas(text.split("\n")):
            md5 = st.get("Description-md5")
            desc = st.get("Description-en") or st.get("Description")
            if md5 and desc:
                long_desc[md5] = desc
    best: dict[str, Entry] = {}
    text, sha["Packages"] = read_input(packages)
    for st in parse_stanzas(text.split("\n")):
        name = st.get("Package")
        if not name:
            continue
        stats["records"] += 1
        section = st.get("Section", "")
        if "/" in section:  # contrib/..., non-free/..., non-free-firmware/...
            stats["skipped_non_main"] += 1
            continue
        desc = st.get("Description-en") or st.get("Description") or ""
        if "\n" not in desc:
            desc = long_desc.get(st.get("Description-md5", ""), desc)
        if "\n" not in desc:
            stats["skipped_no_long_description"] += 1
            continue
        source = (st.get("Source") or name).split()[0]
        entry = Entry(name, source, section, format_description(desc))
        old = best.get(name)
        # Several versions of one package (e.g. a dumpavail over release + updates):
        # keep an order-independent choice, the longest text, ties by text.
        if old is None or (entry.words, entry.text) > (old.words, old.text):
            best[name] = entry
    entries = [best[k] for k in sorted(best)]
    stats["packages"] = len(entries)
    return entries, dict(stats), sha


_TOKEN = re.compile(r"[a-z0-9]+")


def norm_tokens(entry: Entry) -> list[str]:
    """Lower-case word tokens with the package's own names and all digits taken out."""
    names = {entry.package.lower(), entry.source.lower()}
    text = entry.text.lower()
    for n in sorted(names, key=len, reverse=True):
        text = text.replace(n, " ")
    return [t for t in _TOKEN.findall(re.sub(r"\d+", " ", text)) if t]


def shingles(tokens: list[str]) -> set[str]:
    if len(tokens) < SHINGLE:
        return {" ".join(tokens)}
    return {" ".join(tokens[i : i + SHINGLE]) for i in range(len(tokens) - SHINGLE + 1)}


def deduplicate(entries: list[Entry], priority: dict[str, int]) -> tuple[list[Entry], dict]:
    """Drop short texts, exact duplicates and near copies.

    Entries are visited in a fixed order (sections in ``priority`` first, then longer texts,
    then package name) and an entry is kept unless (a) it has fewer than MIN_WORDS words,
    (b) its normalized text (lower case, own package/source name and digits removed) equals a
    kept one, or (c) the Jaccard similarity of its word 3-gram set with a kept entry's is at
    least NEAR_DUP_JACCARD. Candidates for (c) come from an inverted index over 3-grams that
    occur in at most 200 texts (near copies share rarer 3-grams), the 20 best first.
    """
    stats: collections.Counter[str] = collections.Counter()
    order = sorted(
        entries, key=lambda e: (priority.get(e.section, len(priority)), -e.words, e.package)
    )
    df: collections.Counter[str] = collections.Counter()
    sets: dict[str, set[str]] = {}
    keys: dict[str, str] = {}
    for e in order:
        toks = norm_tokens(e)
        keys[e.package] = " ".join(toks)
        sets[e.package] = shingles(toks)
        df.update(sets[e.package])
    seen_keys: set[str] = set()
    index: dict[str, list[int]] = collections.defaultdict(list)
    kept: list[Entry] = []
    for e in order:
        if e.words < MIN_WORDS:
            stats["dropped_short"] += 1
            continue
        key = keys[e.package]
        if key in seen_keys:
            stats["dropped_exact_duplicate"] += 1
            continue
        mine = sets[e.package]
        overlap: collections.Counter[int] = collections.Counter()
        for sh in sorted(mine):  # sorted: set order varies with PYTHONHASHSEED
            if df[sh] <= 200:
                overlap.update(index.get(sh, ()))
        near = False
        for idx, _ in overlap.most_common(20):
            other = sets[kept[idx].package]
            inter = len(mine & other)
            if inter / (len(mine) + len(other) - inter) >= NEAR_DUP_JACCARD:
                near = True
                break
        if near:
            stats["dropped_near_duplicate"] += 1
            continue
        seen_keys.add(key)
        for sh in mine:
            if df[sh] <= 200:
                index[sh].append(len(kept))
        kept.append(e)
    kept.sort(key=lambda e: e.package)
    return kept, dict(stats)


# --------------------------------------------------------------------------- splits


@dataclass
class Splits:
    train: list[Entry]
    valid: list[Entry]
    test: list[Entry]
    unlabeled: list[Entry]


def make_splits(
    entries: list[Entry],
    labels: list[str],
    *,
    seed: int,
    n_train: int,
    n_valid: int,
    n_test: int,
    n_unlabeled: int,
) -> Splits:
    """Split deduplicated entries.

    Labeled pool: entries of the chosen sections, at most one per source package across all
    of them (the longest text, ties by package name), so sibling binaries of one source never
    straddle splits. Per class, in a seeded shuffle: the first
    ``n_test`` go to test, the next ``n_valid`` to valid, the next ``n_train`` (or all that is
    left) to train. Unlabeled: every other deduplicated entry of any section whose source
    package has nothing in valid or test, a seeded sample of at most ``n_unlabeled``.
    """
    rng = random.Random(seed)
    by_source: dict[str, list[Entry]] = {}
    for e in entries:  # entries are sorted by package name
        if e.section in labels:
            by_source.setdefault(e.source, []).append(e)
    by_label: dict[str, list[Entry]] = {lab: [] for lab in labels}
    for _, group in sorted(by_source.items()):
        rep = min(group, key=lambda e: (-e.words, e.package))
        by_label[rep.section].append(rep)
    train: list[Entry] = []
    valid: list[Entry] = []
    test: list[Entry] = []
    for lab in labels:
        reps = by_label[lab]  # sorted by source name
        rng.shuffle(reps)
        need = n_test + n_valid + 1
        if len(reps) < need:
            raise SystemExit(f"section {lab!r} has only {len(reps)} usable entries, need {need}")
        test += reps[:n_test]
        valid += reps[n_test : n_test + n_valid]
        train += reps[n_test + n_valid : n_test + n_valid + n_train]
    held_out_sources = {e.source for e in valid + test}
    used = {e.package for e in train + valid + test}
    pool = [e for e in entries if e.package not in used and e.source not in held_out_sources]
    rng.shuffle(pool)
    unlabeled = sorted(pool[:n_unlabeled], key=lambda e: e.package)

    def order(xs: list[Entry]) -> list[Entry]:
        out = sorted(xs, key=lambda e: e.package)
        rng.shuffle(out)  # a mixed class order, fixed by the seed
        return out

    return Splits(order(train), order(valid), order(test), unlabeled)


# ---------------------------------------------------------------------------- write


def write_jsonl_gz(path: Path, rows: list[dict[str, str]]) -> None:
    data = "".join(json.dumps(r, ensure_ascii=False, sort_keys=False) + "\n" for r in rows)
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(data.encode("utf-8"))
    path.write_bytes(buf.getvalue())


def rows_of(entries: list[Entry], labeled: bool) -> list[dict[str, str]]:
    if labeled:
        return [{"text": e.text, "label": e.section, "package": e.package} for e in entries]
    return [{"text": e.text, "package": e.package} for e in entries]


def word_stats(entries: list[Entry]) -> tuple[float, float]:
    counts = [e.words for e in entries]
    return statistics.fmean(counts), statistics.median(counts)


def baseline_lines(baseline: dict[str, float] | None) -> list[str]:
    if baseline is None:
        return []
    return [
        "## Sanity baseline",
        "",
        "Test accuracy of a multinomial naive Bayes on word unigrams and bigrams (`--baseline`):",
        "",
        f"- majority class: {baseline['majority']:.3f}",
        f"- all of train: {baseline['nb_full_train']:.3f}",
        f"- first 100 rows of train: {baseline['nb_first_100']:.3f}",
        f"- 100 random train rows (mean of 10 samples): {baseline['nb_random_100_mean']:.3f}",
        "",
    ]


def render_readme(
    splits: Splits,
    labels: list[str],
    args: argparse.Namespace,
    load_stats: dict,
    dedup_stats: dict,
    n_dedup: int,
    sha: dict[str, str],
    baseline: dict[str, float] | None,
) -> str:
    names = ("train", "valid", "test", "unlabeled")
    parts = {n: getattr(splits, n) for n in names}
    counts = {n: collections.Counter(e.section for e in parts[n]) for n in names[:3]}
    lines = [
        "# builtin://debian-packages",
        "",
        "Topic classification of Debian package descriptions: given the long description",
        "of a package, predict its archive `Section`. English, human-written, short",
        "documents; the embedded default dataset of ulmfit-operator's examples.",
        "",
        "## Files",
        "",
        "- `train.jsonl.gz`, `valid.jsonl.gz`, `test.jsonl.gz`: one JSON object per line,",
        '  `{"text": ..., "label": ..., "package": ...}`.',
        '- `unlabeled.jsonl.gz`: `{"text": ..., "package": ...}`, for language-model training.',
        "- `labels.json`: the ordered list of label names (class index = position).",
        "",
        "All `.gz` files are written with gzip mtime 0, so a rebuild is byte-identical.",
        "",
        "## Counts",
        "",
        "| split | examples |",
        "|---|---:|",
    ]
    for n in names:
        lines.append(f"| {n} | {len(parts[n])} |")
    lines += ["", "| label | train | valid | test | section holds |", "|---|---:|---:|---:|---|"]
    for lab in labels:
        lines.append(
            f"| {lab} | {counts['train'][lab]} | {counts['valid'][lab]} | {counts['test'][lab]}"
            f" | {SECTION_MEANING.get(lab, '')} |"
        )
    labeled = splits.train + splits.valid + splits.test
    mean_l, med_l = word_stats(labeled)
    mean_u, med_u = word_stats(splits.unlabeled)
    lines += [
        "",
        f"Words per text (whitespace-separated): labeled mean {mean_l:.1f}, median {med_l:g};"
        f" unlabeled mean {mean_u:.1f}, median {med_u:g}.",
        "",
        "## Provenance",
        "",
        f"Source: the Debian {args.release} archive, area `main`, architecture amd64, as"
        f" published on {args.date}:",
        "",
        f"- `dists/{args.suite}/main/binary-amd64/Packages` (section, source, package names),",
        f"- `dists/{args.suite}/main/i18n/Translation-en` (the English long descriptions,"
        " joined on `Description-md5`),",
        "",
        "obtained from the APT index (`apt-get update` with `Acquire::Languages=en`).",
    ]
    for fname, digest in sha.items():
        lines.append(f"SHA-256 of the uncompressed `{fname}` input: `{digest}`.")
    lines += [
        "Older archive states can be fetched from snapshot.debian.org.",
        "",
        "Rebuild with `scripts/build_debian_dataset.py` (see its `--help`), options used:",
        "",
        "```",
        f"--labels {','.join(labels)} --seed {args.seed} --train {args.train}"
        f" --valid {args.valid} --test {args.test} --unlabeled {args.unlabeled}"
        + (" --baseline" if baseline is not None else ""),
        "```",
        "",
        "The decompressed JSON lines depend only on the inputs and these options; the `.gz`",
        "bytes may also depend on the zlib implementation (these were written with stock zlib).",
        "",
        "## Selection rules",
        "",
        f"1. Records: {load_stats.get('records', 0)} package records; sections with an area"
        " prefix (`contrib/`, `non-free/`, `non-free-firmware/`) are skipped. One record per"
        f" package name ({load_stats.get('packages', 0)} packages).",
        "2. Text = synopsis line, then the extended description with Debian formatting undone:",
        "   the leading space of each line removed, ` .` paragraph separators turned into",
        "   newlines, wrapped lines joined by a space, verbatim lines (two leading spaces) and",
        "   list items kept on their own line; runs of whitespace collapsed.",
        "3. Label = the `Section` field.",
        "4. Deduplication, visiting packages of the chosen sections first, then longer texts",
        "   first, then by package name, and keeping a package unless:",
        f"   - its text has fewer than {MIN_WORDS} words"
        f" ({dedup_stats.get('dropped_short', 0)} dropped);",
        "   - its normalized text (lower case, its own package and source names and all digits",
        "     removed, punctuation dropped) equals that of a kept package"
        f" ({dedup_stats.get('dropped_exact_duplicate', 0)} dropped);",
        f"   - the Jaccard similarity of its word {SHINGLE}-gram set (of that normalized text)"
        f" with a kept package's is >= {NEAR_DUP_JACCARD}"
        f" ({dedup_stats.get('dropped_near_duplicate', 0)} dropped).",
        f"   {n_dedup} distinct texts remain.",
        "5. Labeled pool: packages of the chosen sections, at most one per source package",
        "   across all of them (the one with the longest text, ties by package name), so",
        "   sibling binaries of one source never straddle splits.",
        f"6. Per class, in a shuffle seeded with {args.seed}: {args.test} to test, {args.valid}"
        f" to valid, up to {args.train} to train.",
        "7. Unlabeled: all remaining deduplicated texts of every section (not only the chosen",
        "   ones), excluding the train/valid/test texts and any package that shares a source",
        "   package with a valid or test example; a seeded sample of at most"
        f" {args.unlabeled} texts to keep the folder small.",
        "",
        *baseline_lines(baseline),
        "## License",
        "",
        "The texts are package descriptions from the `main` area of the Debian archive. They",
        "are part of each package's metadata (its `debian/control` file), and everything in",
        "`main` must comply with the Debian Free Software Guidelines, which require that it",
        "may be freely redistributed and modified. Each text is attributed, through its",
        "`package` field, to the Debian package whose maintainers (and upstream authors)",
        "wrote it; the copyright and license of each package are in its",
        "`/usr/share/doc/<package>/copyright` file. Only the description texts and section",
        "names are included here. This is a best-effort summary, not legal advice.",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------- baseline


def naive_bayes_baseline(
    train: list[Entry], test: list[Entry], labels: list[str], *, seed: int
) -> dict[str, float]:
    """Test accuracy of a multinomial naive Bayes (numpy) on lower-cased word unigrams and
    bigrams with add-one smoothing: trained on all of train, on the first 100 train rows,
    and averaged over 10 seeded random samples of 100 train rows; plus the majority class."""
    import numpy as np

    def toks(text: str) -> list[str]:
        w = re.findall(r"[a-z][a-z0-9+#\-]*", text.lower())
        return w + [a + " " + b for a, b in itertools.pairwise(w)]

    lab_idx = {lab: i for i, lab in enumerate(labels)}
    y_test = np.array([lab_idx[e.section] for e in test])
    test_toks = [toks(e.text) for e in test]

    def accuracy(sub: list[Entry]) -> float:
        vocab: dict[str, int] = {}
        docs = []
        for e in sub:
            ids = [vocab.setdefault(w, len(vocab)) for w in toks(e.text)]
            docs.append((lab_idx[e.section], ids))
        counts = np.ones((len(labels), len(vocab)))
        prior = np.ones(len(labels))
        for y, ids in docs:
            prior[y] += 1
            np.add.at(counts[y], ids, 1)
        logp = np.log(counts / counts.sum(1, keepdims=True))
        logprior = np.log(prior / prior.sum())
        pred = [
            int(np.argmax(logprior + logp[:, [vocab[w] for w in t if w in vocab]].sum(1)))
            for t in test_toks
        ]
        return float(np.mean(np.array(pred) == y_test))

    majority = collections.Counter(e.section for e in train).most_common(1)[0][0]
    rng = random.Random(seed)
    return {
        "majority": float(np.mean(y_test == lab_idx[majority])),
        "nb_full_train": accuracy(train),
        "nb_first_100": accuracy(train[:100]),
        "nb_random_100_mean": statistics.fmean(accuracy(rng.sample(train, 100)) for _ in range(10)),
    }


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "packages",
        nargs="?",
        default="-",
        help="Packages index / `apt-cache dumpavail` output (.gz/.xz/.bz2 ok); '-' = stdin",
    )
    p.add_argument(
        "--translations",
        metavar="FILE",
        help="i18n/Translation-en file with the long descriptions, joined on Description-md5",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="output folder (default: the package data folder,"
        " trainer/ulmfit_trainer/datasets/debian_packages)",
    )
    p.add_argument(
        "--labels",
        default=",".join(DEFAULT_LABELS),
        help="comma-separated sections used as classes, in label order (%(default)s)",
    )
    p.add_argument("--seed", type=int, default=20240101, help="shuffle seed (%(default)s)")
    p.add_argument("--train", type=int, default=400, help="max train per class (%(default)s)")
    p.add_argument("--valid", type=int, default=100, help="valid per class (%(default)s)")
    p.add_argument("--test", type=int, default=150, help="test per class (%(default)s)")
    p.add_argument("--unlabeled", type=int, default=18000, help="max unlabeled texts (%(default)s)")
    p.add_argument(
        "--release",
        default='12 "bookworm"',
        help="release named in README.md (%(default)s)",
    )
    p.add_argument("--suite", default="bookworm", help="suite named in README.md (%(default)s)")
    p.add_argument(
        "--date", default="unknown", help="archive publication date for README.md (YYYY-MM-DD)"
    )
    p.add_argument(
        "--baseline",
        action="store_true",
        help="compute a naive Bayes sanity baseline (needs numpy); print it, add it to README.md",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    labels = [s.strip() for s in args.labels.split(",") if s.strip()]
    entries, load_stats, sha = load_entries(args.packages, args.translations)
    if not entries:
        raise SystemExit("no package with a long description found (need --translations?)")
    priority = {lab: 0 for lab in labels}
    kept, dedup_stats = deduplicate(entries, priority)
    splits = make_splits(
        kept,
        labels,
        seed=args.seed,
        n_train=args.train,
        n_valid=args.valid,
        n_test=args.test,
        n_unlabeled=args.unlabeled,
    )
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for name in ("train", "valid", "test"):
        write_jsonl_gz(out / f"{name}.jsonl.gz", rows_of(getattr(splits, name), True))
    write_jsonl_gz(out / "unlabeled.jsonl.gz", rows_of(splits.unlabeled, False))
    (out / "labels.json").write_text(json.dumps(labels, indent=2) + "\n", encoding="utf-8")
    baseline = (
        naive_bayes_baseline(splits.train, splits.test, labels, seed=args.seed)
        if args.baseline
        else None
    )
    readme = render_readme(splits, labels, args, load_stats, dedup_stats, len(kept), sha, baseline)
    (out / "README.md").write_text(readme, encoding="utf-8")

    report = {
        "load": load_stats,
        "dedup": dedup_stats,
        "distinct": len(kept),
        "splits": {n: len(getattr(splits, n)) for n in ("train", "valid", "test", "unlabeled")},
        "bytes": {p.name: p.stat().st_size for p in sorted(out.iterdir())},
    }
    print(json.dumps(report, indent=2), file=sys.stderr)
    if args.baseline:
        print(json.dumps({"test_accuracy": baseline}, indent=2), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
