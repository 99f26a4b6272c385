"""Loaders for the paper's evaluation sets, reading the files in the form they are distributed.

Every loader takes ``root``, the dataset's own folder (default: ``data_dir() / <folder>``), and
returns a dict of splits. Text sets give :class:`TextSplit` (texts, integer labels); MSRP and SICK
give :class:`PairSplit` (two texts per example). A split that is not distributed here (several test
splits are held back) is simply absent from the dict; a missing required file raises
:class:`DatasetNotFoundError` saying which file, where, and how to get it.

========== ============ ================================================================ =====================
name       folder       files (any of the listed names)                                  splits
========== ============ ================================================================ =====================
sst2       sst2         {train,dev,test}_binary_sent.csv (``label,sentence``)             train, dev, [test]
imdb       imdb         aclImdb/{train,test}/{pos,neg}/*.txt, or {train,test}.csv[.gz]    train, [test]
mr         mr           rt-polarity.pos / .neg (also under rt-polaritydata/)              all
cr         cr           custrev.pos / .neg (also under customerr/)                        all
subj       subj         subj.subjective / .objective, or quote.tok.gt9.5000 /             all
                        plot.tok.gt9.5000 (the original rotten_imdb names)
mpqa       mpqa         mpqa.pos / .neg                                                   all
msrp       msrp         msr_paraphrase_{train,test}.txt (TSV)                             train, [test]
sick       sick         SICK_train.txt, SICK_trial.txt, SICK_test_annotated.txt (TSV)     train, [dev], [test]
yelp       yelp         train.csv, test.csv (also under yelp_review_polarity_csv/)        train, [test]
multidomain amazon      multidomain.csv[.gz], or <domain>/{positive,negative}.review      all
========== ============ ================================================================ =====================

Labels: 1 = positive (sentiment sets), 1 = subjective (SUBJ), 1 = paraphrase (MSRP); SICK labels
are relatedness scores in [1, 5] (float).

What the loaders do with the originals' quirks (all tested):

* Encodings: a file that is valid UTF-8 is read as UTF-8; otherwise each line that is not valid
  UTF-8 is read as Windows-1252 (SUBJ's ``subj.subjective``, MR), bytes Windows-1252 leaves
  undefined as their Latin-1 code points. A UTF-8 byte-order mark (MSRP) is dropped.
* Line files (MR, CR, SUBJ, MPQA): one example per line; blank lines (MPQA has some) are skipped;
  the line ending is removed, nothing else.
* Headers: MSRP's ``Quality ...`` and SICK's ``pair_ID ...`` header lines are skipped when present
  (some copies have them stripped).
* Markup: IMDB's ``<br />`` tags become a newline (a run of them, one newline; ``keep_markup=True``
  keeps them); HTML entities in the Blitzer reviews (``&quot;``, ``&amp;``) are unescaped. Yelp's
  escaped ``\\n`` becomes a newline. Other control bytes (a few 0x1A in Blitzer) are kept: the
  byte model reads them like any byte.
* Damage (:mod:`._files`): each of these is one :class:`InputError` naming the file (and line), never
  rows dropped or merged in silence: a file with no example; a CSV row whose quotes never close, or
  whose field count differs from the header's; a TSV row with too few or too many fields; a UTF-16
  or UTF-32 file; a folder where a file should be. Line endings may be LF, CRLF or a lone CR.
"""

from __future__ import annotations

import html
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError, InputTypeError, MissingInputError
from ._files import csv_rows as _csv_rows
from ._files import decode
from ._files import label as _label
from ._files import lines as _lines
from ._files import read_text as _read_text
from ._files import tsv_rows as _tsv_rows

__all__ = [
    "DATASETS",
    "ENV_DATA",
    "DatasetNotFoundError",
    "PairSplit",
    "TextSplit",
    "data_dir",
    "dataset_dir",
    "decode",
    "load",
    "load_cr",
    "load_imdb",
    "load_mpqa",
    "load_mr",
    "load_msrp",
    "load_multidomain",
    "load_sick",
    "load_sst2",
    "load_subj",
    "load_yelp",
]

ENV_DATA = "FASTMLSTM_DATA"
DEFAULT_DATA_DIR = Path("~/.cache/fastmlstm/data")


class DatasetNotFoundError(MissingInputError):
    """A dataset file is missing; the message names it, where it was looked for and how to get it."""


def _text_list(items, name: str) -> list:
    """``items`` as a list (a split's texts, ids or groups); a single str or a non-sequence is refused."""
    if isinstance(items, (str, bytes)):
        raise InputTypeError(f"{name} must be a list with one entry per example, not a single {type(items).__name__}")
    if isinstance(items, list):
        return items
    if isinstance(items, np.ndarray):
        return items.tolist()
    try:
        return list(items)
    except TypeError:
        raise InputTypeError(f"{name} must be a list with one entry per example, got {type(items).__name__}") from None


def _same_length(name: str, items: list, other: str, others: list) -> None:
    if len(items) != len(others):
        raise InputError(f"a split has {len(others)} {other} but {len(items)} {name}; they must have one length")


def _label_array(labels, n: int, what: str) -> np.ndarray:
    """A split's labels as a 1-D array of ``n`` entries, one per ``what`` (text or pair)."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != n:
        raise InputError(f"a split has {n} {what}s but labels of shape {labels.shape}; it needs one label per {what}")
    return labels


@dataclass
class TextSplit:
    """Labelled texts: ``texts`` (N str) and ``labels`` [N] int64; ``groups`` optional [N] str
    (the Blitzer domain). Lengths that differ raise :class:`InputError` here, not at first use."""

    texts: list[str]
    labels: np.ndarray
    groups: list[str] | None = None

    def __post_init__(self):
        self.texts = _text_list(self.texts, "texts")
        self.labels = _label_array(self.labels, len(self.texts), "text")
        if self.groups is not None:
            self.groups = _text_list(self.groups, "groups")
            _same_length("groups", self.groups, "texts", self.texts)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: Sequence[int] | np.ndarray) -> TextSplit:
        index = np.asarray(index, dtype=np.int64)
        groups = None if self.groups is None else [self.groups[i] for i in index]
        return TextSplit([self.texts[i] for i in index], self.labels[index], groups)


@dataclass
class PairSplit:
    """Text pairs: ``first``, ``second`` (N str each) and ``labels`` [N] (int64 for MSRP, float64
    relatedness for SICK); ``ids`` empty or [N]. Lengths that differ raise :class:`InputError` here."""

    first: list[str]
    second: list[str]
    labels: np.ndarray
    ids: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.first, self.second = _text_list(self.first, "first"), _text_list(self.second, "second")
        _same_length("second texts", self.second, "first texts", self.first)
        self.labels = _label_array(self.labels, len(self.first), "pair")
        self.ids = _text_list(self.ids, "ids")
        if self.ids:
            _same_length("ids", self.ids, "pairs", self.first)

    def __len__(self) -> int:
        return len(self.first)

    def subset(self, index: Sequence[int] | np.ndarray) -> PairSplit:
        index = np.asarray(index, dtype=np.int64)
        ids = [self.ids[i] for i in index] if self.ids else []
        return PairSplit([self.first[i] for i in index], [self.second[i] for i in index], self.labels[index], ids)


# ----------------------------------------------------------------------------------------------
# Locations


def data_dir() -> Path:
    """The data folder: ``$FASTMLSTM_DATA`` if set, else ``~/.cache/fastmlstm/data``."""
    value = os.environ.get(ENV_DATA)
    return Path(value).expanduser() if value else DEFAULT_DATA_DIR.expanduser()


def dataset_dir(name: str, root: str | os.PathLike | None = None) -> Path:
    """The folder a dataset is read from: ``root`` if given, else ``data_dir() / <its folder>``."""
    if name not in DATASETS:
        raise InputError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return Path(root).expanduser() if root is not None else data_dir() / DATASETS[name].folder


def _missing(name: str, root: Path, wanted: str) -> DatasetNotFoundError:
    info = DATASETS[name]
    how = (f"fetch it with `fastmlstm download {name}` (or fastmlstm.download.download({name!r}))"
           if info.downloadable else f"get it from {info.homepage}")
    return DatasetNotFoundError(
        f"{info.title}: no {wanted} in {root}. Put the distributed files there, point ${ENV_DATA} at the folder "
        f"holding {info.folder}/, or {how}.")


def _first_existing(root: Path, candidates: Sequence[str]) -> Path | None:
    """The first candidate that is a file. A candidate that is there but is not a file (a folder of
    that name) is an error rather than skipped: the loader would report the file as missing, or
    quietly leave out an optional split."""
    if root.exists() and not root.is_dir():
        raise InputError(f"{root} is a file; give the dataset's folder")
    for rel in candidates:
        p = root / rel
        if p.is_file():
            return p
        if p.exists():
            raise InputError(f"{p} is {'a folder' if p.is_dir() else 'not a regular file'}; expected the "
                             f"dataset file {p.name}")
    return None


def _find(name: str, root: Path, candidates: Sequence[str], *, required: bool = True) -> Path | None:
    p = _first_existing(root, candidates)
    if p is None and required:
        raise _missing(name, root, " or ".join(candidates))
    return p


def _labelled_csv(path: Path, label_col: int, text_col: int, header: Sequence[str] | None,
                  mapping: dict[str, int], clean: Callable[[str], str] = lambda s: s) -> TextSplit:
    texts, labels = [], []
    fields = None if header else max(label_col, text_col) + 1  # a headerless file: exactly these columns
    for line, row in _csv_rows(path, header=header, fields=fields):
        if len(row) <= max(label_col, text_col):
            raise InputError(f"{path}, line {line}: expected at least {max(label_col, text_col) + 1} fields, "
                             f"got {len(row)}")
        labels.append(_label(row[label_col], path, line, mapping))
        texts.append(clean(row[text_col]))
    return TextSplit(texts, np.asarray(labels, dtype=np.int64))


def _two_files(name: str, root: Path, pos: Sequence[str], neg: Sequence[str]) -> TextSplit:
    """Line-per-example positive and negative files -> one split, positives first (label 1)."""
    pos_path = _find(name, root, pos)
    neg_path = _find(name, root, neg)
    p, n = _lines(pos_path), _lines(neg_path)
    return TextSplit(p + n, np.asarray([1] * len(p) + [0] * len(n), dtype=np.int64))


_BINARY = {"0": 0, "1": 1}

# ----------------------------------------------------------------------------------------------
# The datasets


def load_sst2(root: str | os.PathLike | None = None) -> dict[str, TextSplit]:
    """Stanford Sentiment Treebank, binary, sentence level, raw cased text: the CSVs the paper's
    authors released (``label,sentence``; 1 = positive). Splits train, dev and, where present, test."""
    root = dataset_dir("sst2", root)
    out = {}
    for split, required in (("train", True), ("dev", True), ("test", False)):
        path = _find("sst2", root, [f"{split}_binary_sent.csv"], required=required)
        if path is not None:
            out[split] = _labelled_csv(path, 0, 1, ("label", "sentence"), _BINARY)
    return out


_BR = re.compile(r"(?:\s*<br\s*/?>\s*)+", re.IGNORECASE)


def _imdb_clean(keep_markup: bool) -> Callable[[str], str]:
    return (lambda s: s) if keep_markup else (lambda s: _BR.sub("\n", s).strip())


def _imdb_folder(name: str, split_dir: Path, clean) -> TextSplit:
    texts, labels = [], []
    for label, sub in ((1, "pos"), (0, "neg")):
        folder = split_dir / sub
        if not folder.is_dir():
            raise _missing(name, split_dir, f"{sub}/ folder (aclImdb layout: {split_dir.name}/pos, {split_dir.name}/neg)")
        files = sorted(folder.glob("*.txt"), key=lambda p: (_imdb_id(p), p.name))
        if not files:
            raise _missing(name, folder, "review files (*.txt)")
        for f in files:
            texts.append(clean(_read_text(f)))
            labels.append(label)
    return TextSplit(texts, np.asarray(labels, dtype=np.int64))


def _imdb_id(path: Path) -> int:
    head = path.stem.split("_")[0]
    return int(head) if head.isdigit() else -1


def load_imdb(root: str | os.PathLike | None = None, *, keep_markup: bool = False) -> dict[str, TextSplit]:
    """Large Movie Review Dataset v1.0 (Maas et al. 2011): the ``aclImdb`` folders
    (``{train,test}/{pos,neg}/<id>_<rating>.txt``) or CSVs ``{train,test}.csv[.gz]`` (``label,text``).

    ``<br />`` tags become newlines unless ``keep_markup``. Split train is required, test optional.
    Folder files are read in id order, positives first; CSV rows keep the file's order (the shared
    copy is sorted by label: shuffle before taking a subset).
    """
    root = dataset_dir("imdb", root)
    clean = _imdb_clean(keep_markup)
    bases = [root / "aclImdb", root]
    out = {}
    for split in ("train", "test"):
        folder = next((b / split for b in bases if (b / split).is_dir()), None)
        if folder is not None:
            out[split] = _imdb_folder("imdb", folder, clean)
            continue
        path = _find("imdb", root, [f"{split}.csv", f"{split}.csv.gz"], required=False)
        if path is not None:
            out[split] = _labelled_csv(path, 0, 1, ("label", "text"), _BINARY, clean)
        elif split == "train":
            raise _missing("imdb", root, "aclImdb/train/{pos,neg}/ folders or train.csv[.gz]")
    return out


def load_mr(root: str | os.PathLike | None = None) -> dict[str, TextSplit]:
    """Movie Review sentence polarity v1.0 (Pang & Lee 2005): ``rt-polarity.pos`` / ``.neg``, one
    sentence per line, Windows-1252. One split, ``all`` (evaluate by 10-fold cross-validation)."""
    root = dataset_dir("mr", root)
    return {"all": _two_files("mr", root, ["rt-polarity.pos", "rt-polaritydata/rt-polarity.pos"],
                              ["rt-polarity.neg", "rt-polaritydata/rt-polarity.neg"])}


def load_cr(root: str | os.PathLike | None = None) -> dict[str, TextSplit]:
    """Customer Reviews (Hu & Liu 2004) as ``custrev.pos`` / ``custrev.neg`` (one sentence per line).
    One split, ``all`` (10-fold cross-validation)."""
    root = dataset_dir("cr", root)
    return {"all": _two_files("cr", root, ["custrev.pos", "customerr/custrev.pos"],
                              ["custrev.neg", "customerr/custrev.neg"])}


def load_subj(root: str | os.PathLike | None = None) -> dict[str, TextSplit]:
    """Subjectivity v1.0 (Pang & Lee 2004): ``subj.subjective`` / ``subj.objective`` (or the original
    ``quote.tok.gt9.5000`` / ``plot.tok.gt9.5000``); label 1 = subjective. One split, ``all``."""
    root = dataset_dir("subj", root)
    return {"all": _two_files(
        "subj", root,
        ["subj.subjective", "quote.tok.gt9.5000", "rotten_imdb/quote.tok.gt9.5000"],
        ["subj.objective", "plot.tok.gt9.5000", "rotten_imdb/plot.tok.gt9.5000"])}


def load_mpqa(root: str | os.PathLike | None = None) -> dict[str, TextSplit]:
    """MPQA opinion polarity phrases (as used by SentEval): ``mpqa.pos`` / ``mpqa.neg``; blank lines
    are skipped. One split, ``all``."""
    root = dataset_dir("mpqa", root)
    return {"all": _two_files("mpqa", root, ["mpqa.pos"], ["mpqa.neg"])}


def load_msrp(root: str | os.PathLike | None = None) -> dict[str, PairSplit]:
    """Microsoft Research Paraphrase Corpus: ``msr_paraphrase_{train,test}.txt``, TSV with a
    byte-order mark (``Quality, #1 ID, #2 ID, #1 String, #2 String``; header optional). Label 1 =
    paraphrase. Split train required, test optional."""
    root = dataset_dir("msrp", root)
    out = {}
    for split, required in (("train", True), ("test", False)):
        path = _find("msrp", root, [f"msr_paraphrase_{split}.txt", f"MSRParaphraseCorpus/msr_paraphrase_{split}.txt"],
                     required=required)
        if path is None:
            continue
        first, second, labels, ids = [], [], [], []
        for number, f in _tsv_rows(path, 5, "Quality"):
            labels.append(_label(f[0], path, number, _BINARY))
            ids.append(f"{f[1]}-{f[2]}")
            first.append(f[3])
            second.append(f[4])
        out[split] = PairSplit(first, second, np.asarray(labels, dtype=np.int64), ids)
    return out


def load_sick(root: str | os.PathLike | None = None) -> dict[str, PairSplit]:
    """SICK relatedness (SemEval-2014 task 1): ``SICK_train.txt``, ``SICK_trial.txt`` (split ``dev``)
    and ``SICK_test_annotated.txt`` (``test``), TSV ``pair_ID, sentence_A, sentence_B,
    relatedness_score, entailment_judgment`` (header optional). Labels are the float scores."""
    root = dataset_dir("sick", root)
    out = {}
    for split, fname, required in (("train", "SICK_train.txt", True), ("dev", "SICK_trial.txt", False),
                                   ("test", "SICK_test_annotated.txt", False)):
        path = _find("sick", root, [fname, f"SICK/{fname}"], required=required)
        if path is None:
            continue
        first, second, scores, ids = [], [], [], []
        for number, f in _tsv_rows(path, 4, "pair_ID", 5):
            try:
                score = float(f[3])
            except ValueError:
                raise InputError(f"{path}, line {number}: relatedness {f[3]!r} is not a number") from None
            if not 1.0 <= score <= 5.0:
                raise InputError(f"{path}, line {number}: relatedness {score} outside [1, 5]")
            ids.append(f[0])
            first.append(f[1])
            second.append(f[2])
            scores.append(score)
        out[split] = PairSplit(first, second, np.asarray(scores, dtype=np.float64), ids)
    return out


def _yelp_clean(s: str) -> str:
    # Zhang et al.'s CSVs escape newlines as a backslash and an "n" and quotes as a backslash and a quote.
    return s.replace("\\n", "\n").replace('\\"', '"')


def load_yelp(root: str | os.PathLike | None = None) -> dict[str, TextSplit]:
    """Yelp review polarity (Zhang et al. 2015): ``train.csv`` / ``test.csv`` without header,
    ``"label","text"`` with label 1 = negative, 2 = positive (mapped to 0 / 1). Split train required,
    test optional."""
    root = dataset_dir("yelp", root)
    out = {}
    for split, required in (("train", True), ("test", False)):
        path = _find("yelp", root, [f"{split}.csv", f"yelp_review_polarity_csv/{split}.csv"], required=required)
        if path is not None:
            out[split] = _labelled_csv(path, 0, 1, None, {"1": 0, "2": 1}, _yelp_clean)
    return out


_REVIEW_TEXT = re.compile(r"<review_text>\s*(.*?)\s*</review_text>", re.DOTALL)
_DOMAINS = ("books", "dvd", "electronics", "kitchen")


def load_multidomain(root: str | os.PathLike | None = None) -> dict[str, TextSplit]:
    """Blitzer et al. (2007) multi-domain Amazon reviews, labelled part (books, dvd, electronics,
    kitchen; 1,000 positive and 1,000 negative each): ``multidomain.csv[.gz]`` (``label,text,domain,...``)
    or the original ``<domain>/{positive,negative}.review`` pseudo-XML. HTML entities are unescaped;
    ``groups`` holds the domain. One split, ``all`` (10-fold cross-validation)."""
    root = dataset_dir("multidomain", root)
    path = _find("multidomain", root, ["multidomain.csv.gz", "multidomain.csv"], required=False)
    if path is not None:
        texts, labels, groups = [], [], []
        for line, row in _csv_rows(path, header=("label", "text", "domain")):
            labels.append(_label(row[0], path, line, _BINARY))
            texts.append(html.unescape(row[1]))
            groups.append(row[2])
        return {"all": TextSplit(texts, np.asarray(labels, dtype=np.int64), groups)}
    domains = []
    if root.is_dir():
        domains = [d for d in _DOMAINS if (root / d).is_dir()] or [
            p.name for p in sorted(root.iterdir()) if p.is_dir() and (p / "positive.review").is_file()]
    if not domains:
        raise _missing("multidomain", root, "multidomain.csv[.gz] or <domain>/positive.review, negative.review")
    texts, labels, groups = [], [], []
    for d in domains:
        for label, fname in ((1, "positive.review"), (0, "negative.review")):
            f = _find("multidomain", root / d, [fname])
            reviews = [html.unescape(re.sub(r"\s+", " ", m.group(1))) for m in _REVIEW_TEXT.finditer(_read_text(f))]
            if not reviews:
                raise InputError(f"{f} holds no <review_text> element: not a Blitzer .review file, or an empty one")
            texts += reviews
            labels += [label] * len(reviews)
            groups += [d] * len(reviews)
    return {"all": TextSplit(texts, np.asarray(labels, dtype=np.int64), groups)}


@dataclass(frozen=True)
class DatasetInfo:
    title: str
    folder: str
    loader: Callable
    kind: str  # "text" or "pair"
    protocol: str  # "splits", "cv10", "pair-classification", "relatedness"
    homepage: str
    downloadable: bool = True


DATASETS: dict[str, DatasetInfo] = {
    "sst2": DatasetInfo("SST-2", "sst2", load_sst2, "text", "splits",
                        "https://github.com/openai/generating-reviews-discovering-sentiment/tree/master/data"),
    "imdb": DatasetInfo("IMDB", "imdb", load_imdb, "text", "splits", "https://ai.stanford.edu/~amaas/data/sentiment/"),
    "mr": DatasetInfo("MR", "mr", load_mr, "text", "cv10", "https://www.cs.cornell.edu/people/pabo/movie-review-data/"),
    "cr": DatasetInfo("CR", "cr", load_cr, "text", "cv10",
                      "https://www.cs.uic.edu/~liub/FBS/sentiment-analysis.html"),
    "subj": DatasetInfo("SUBJ", "subj", load_subj, "text", "cv10",
                        "https://www.cs.cornell.edu/people/pabo/movie-review-data/"),
    "mpqa": DatasetInfo("MPQA", "mpqa", load_mpqa, "text", "cv10", "https://mpqa.cs.pitt.edu/"),
    "msrp": DatasetInfo("MSRP", "msrp", load_msrp, "pair", "pair-classification",
                        "https://www.microsoft.com/en-us/download/details.aspx?id=52398"),
    "sick": DatasetInfo("SICK relatedness", "sick", load_sick, "pair", "relatedness",
                        "https://marcobaroni.org/composes/sick.html"),
    "yelp": DatasetInfo("Yelp review polarity", "yelp", load_yelp, "text", "splits",
                        "https://github.com/zhangxiangxiao/Crepe"),
    "multidomain": DatasetInfo("Blitzer multi-domain reviews", "amazon", load_multidomain, "text", "cv10",
                               "https://www.cs.jhu.edu/~mdredze/datasets/sentiment/", downloadable=False),
}


def load(name: str, root: str | os.PathLike | None = None, **kwargs) -> dict[str, TextSplit | PairSplit]:
    """Load dataset ``name`` (one of :data:`DATASETS`) from ``root`` (default ``data_dir()/<folder>``).

    Example::

        >>> splits = fastmlstm.datasets.load("sst2")          # doctest: +SKIP
        >>> len(splits["train"]), splits["train"].labels[:3]  # doctest: +SKIP
        (6920, array([1, 0, 0]))
    """
    if name not in DATASETS:
        raise InputError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return DATASETS[name].loader(root, **kwargs)
