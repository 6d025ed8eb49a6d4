"""An offline, labelled English topic-classification data set built from Debian's `fortunes`.

The `fortunes` package (``apt-get install fortunes``) ships quotes sorted by topic under
/usr/share/games/fortunes/<category>, entries separated by a line holding a single '%'.
The category is the label.

Fortunes are short (30-80 tokens), but sparse attention matters only at long sequences, so an
example is a *document*: fortunes of ONE category, drawn at random and concatenated (as token
ids) until the document is exactly ``seq_len`` tokens long ([CLS] ... [SEP]; the last fortune
is cut).  Optionally a fraction of the fortunes in each document are distractors from mixed-topic
categories, which makes the task harder: the topical evidence is spread thinly over the document.

Train/test split: each category's fortunes (and the distractor fortunes) are shuffled with the
seed and split *by fortune* before any document is built: a fortune used in a train document never
appears in a test document.  Repeated fortunes are removed first (duplicates within a file, and
the few texts that appear in two categories, so the same text cannot sit on both sides).  Within one split a fortune can appear in several documents (there
are only ~150-1000 fortunes per category), but never twice in one document unless the pool runs
out.  The split depends only on the seed and ``test_frac``, not on seq_len or the data set sizes,
so runs at different lengths see the same train/test fortunes.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

import torch
from torch.utils.data import TensorDataset

FORTUNES_DIR = "/usr/share/games/fortunes"
INSTALL_HINT = "apt-get update && apt-get install -y fortunes"

# Distinct topics with >= 140 fortunes each (Debian fortunes 1:1.99.1): computers 1051,
# food 198, law 206, love 150, politics 703, science 625, sports 147, startrek 227.
DEFAULT_CATEGORIES = ("computers", "food", "law", "love", "politics", "science", "sports", "startrek")
# Mixed-topic categories used only as distractors (never as labels).
DISTRACTOR_CATEGORIES = ("cookie", "miscellaneous", "platitudes")


class FortunesMissing(FileNotFoundError):
    """The Debian `fortunes` data files are not installed."""


def fortunes_available(directory: str = FORTUNES_DIR) -> bool:
    return os.path.isfile(os.path.join(directory, DEFAULT_CATEGORIES[0]))


def list_categories(directory: str = FORTUNES_DIR) -> list[str]:
    """Category files in `directory` (skips the .dat indexes, .u8 links and the offensive off/ dir)."""
    if not os.path.isdir(directory):
        raise FortunesMissing(f"{directory} does not exist; install the fortunes with: {INSTALL_HINT}")
    return sorted(name for name in os.listdir(directory)
                  if "." not in name and os.path.isfile(os.path.join(directory, name)))


def read_category(name: str, directory: str = FORTUNES_DIR) -> list[str]:
    """The fortunes of one category, whitespace-normalised, empty ones dropped, file order."""
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        raise FortunesMissing(f"no fortune category {name!r} at {path}; install the fortunes with: {INSTALL_HINT}"
                              + (f" (available: {', '.join(list_categories(directory))})"
                                 if os.path.isdir(directory) else ""))
    with open(path, encoding="utf-8", errors="replace") as fh:
        text = fh.read()
    entries, current = [], []
    for line in text.splitlines():
        if line.strip() == "%":
            entries.append(" ".join(" ".join(current).split()))
            current = []
        else:
            current.append(line)
    entries.append(" ".join(" ".join(current).split()))
    return [e for e in entries if e]


@dataclass
class _Pool:
    """Token ids of the fortunes of one split, drawn without replacement, refilled when empty."""
    fortunes: list  # list[list[int]]
    rng: random.Random

    def __post_init__(self) -> None:
        self._queue: list = []

    def draw(self) -> list:
        if not self._queue:
            self._queue = list(range(len(self.fortunes)))
            self.rng.shuffle(self._queue)
        return self.fortunes[self._queue.pop()]


def _unique_fortunes(categories, directory: str) -> dict:
    """{category: fortunes}, each fortune at most once per category, and fortunes found in more than
    one category dropped: the files share a few (e.g. computers and cookie), which would leak test
    text into training under another label."""
    # always dedupe against the same wide set, so a category's fortunes do not depend on which
    # other categories (or whether distractors) a run uses
    universe = sorted(set(categories) | set(DEFAULT_CATEGORIES) | set(DISTRACTOR_CATEGORIES))
    texts = {c: list(dict.fromkeys(read_category(c, directory))) for c in universe}
    seen: dict = {}
    for c in universe:
        for t in texts[c]:
            seen[t] = seen.get(t, 0) + 1
    return {c: [t for t in texts[c] if seen[t] == 1] for c in categories}


def split_fortunes(categories, seed: int, test_frac: float = 0.2,
                   directory: str = FORTUNES_DIR) -> dict:
    """{category: (train_texts, test_texts)}: a seeded shuffle then a cut, per category."""
    out = {}
    for cat, texts in _unique_fortunes(list(categories), directory).items():
        # the category name in the seed keeps each category's split independent of the others
        order = list(range(len(texts)))
        random.Random(f"{seed}-{cat}").shuffle(order)
        n_test = max(1, round(len(texts) * test_frac))
        out[cat] = ([texts[i] for i in order[n_test:]], [texts[i] for i in order[:n_test]])
    return out


def _build_documents(pools: list, distractors, n: int, seq_len: int, distractor_frac: float,
                     cls_id: int, sep_id: int, rng: random.Random):
    """n documents, labels round-robin (so classes are balanced to within one), then shuffled."""
    body = seq_len - 2  # room for [CLS] and [SEP]
    labels = [i % len(pools) for i in range(n)]
    rng.shuffle(labels)
    ids = torch.empty(n, seq_len, dtype=torch.long)
    for row, label in enumerate(labels):
        tokens: list = []
        while len(tokens) < body:
            use_distractor = distractors is not None and rng.random() < distractor_frac
            tokens.extend((distractors if use_distractor else pools[label]).draw())
        ids[row] = torch.tensor([cls_id] + tokens[:body] + [sep_id])
    return ids, torch.ones_like(ids), torch.tensor(labels, dtype=torch.long)


def _build_single(pools: list, n: int, seq_len: int, cls_id: int, sep_id: int, pad_id: int, rng: random.Random):
    """n examples of ONE fortune each ([CLS] fortune [SEP], cut to seq_len), padded to seq_len as GLUE runs pad to
    their max length; labels round-robin then shuffled."""
    labels = [i % len(pools) for i in range(n)]
    rng.shuffle(labels)
    ids = torch.full((n, seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros(n, seq_len, dtype=torch.long)
    for row, label in enumerate(labels):
        tokens = [cls_id] + pools[label].draw()[: seq_len - 2] + [sep_id]
        ids[row, :len(tokens)] = torch.tensor(tokens)
        mask[row, :len(tokens)] = 1
    return ids, mask, torch.tensor(labels, dtype=torch.long)


def load_splits(tokenizer, seq_len: int, n_train: int, n_test: int, seed: int = 0,
                categories=DEFAULT_CATEGORIES, test_frac: float = 0.2, distractor_frac: float = 0.0,
                directory: str = FORTUNES_DIR, examples: str = "documents"):
    """(train_dataset, test_dataset, label_names).

    Each dataset is a TensorDataset of (input_ids [N, seq_len] long, attention_mask [N, seq_len]
    long, all ones since documents are filled to seq_len, labels [N] long).  `tokenizer` is a
    BERT-style HF tokenizer (cls/sep tokens); label i is ``label_names[i]``.  ``examples="single"``: one fortune
    per example, padded to seq_len (attention_mask 0 on the padding), the shape of a GLUE sentence task.
    """
    if examples not in ("documents", "single"):
        raise ValueError(f"examples={examples!r} must be 'documents' or 'single'")
    if examples == "single" and distractor_frac:
        raise ValueError("distractor_frac applies to documents only (examples='documents')")
    if seq_len < 8:
        raise ValueError(f"seq_len={seq_len} is too short for a document")
    if not 0.0 <= distractor_frac < 1.0:
        raise ValueError(f"distractor_frac={distractor_frac} must be in [0, 1)")
    if not os.path.isdir(directory):
        raise FortunesMissing(f"{directory} does not exist; install the fortunes with: {INSTALL_HINT}")
    categories = list(categories)
    splits = split_fortunes(categories, seed, test_frac, directory)
    mixed = split_fortunes(DISTRACTOR_CATEGORIES, seed, test_frac, directory) if distractor_frac > 0 else {}

    def encode(texts: list) -> list:
        # no special tokens: documents get a single [CLS]/[SEP] pair around the whole body
        return tokenizer(texts, add_special_tokens=False, truncation=False)["input_ids"]

    datasets = []
    for part, n, offset in (("train", n_train, 1), ("test", n_test, 2)):
        idx = 0 if part == "train" else 1
        rng = random.Random(seed * 1000 + offset)
        pools = [_Pool(encode(splits[c][idx]), rng) for c in categories]
        distractors = None
        if mixed:
            distractors = _Pool(encode([t for c in DISTRACTOR_CATEGORIES for t in mixed[c][idx]]), rng)
        if examples == "single":
            tensors = _build_single(pools, n, seq_len, tokenizer.cls_token_id, tokenizer.sep_token_id,
                                    tokenizer.pad_token_id, rng)
        else:
            tensors = _build_documents(pools, distractors, n, seq_len, distractor_frac,
                                       tokenizer.cls_token_id, tokenizer.sep_token_id, rng)
        datasets.append(TensorDataset(*tensors))
    return datasets[0], datasets[1], categories


def describe(categories=DEFAULT_CATEGORIES, seed: int = 0, test_frac: float = 0.2,
             directory: str = FORTUNES_DIR) -> dict:
    """Fortune counts per category and split (for reports)."""
    splits = split_fortunes(categories, seed, test_frac, directory)
    return {c: {"train_fortunes": len(tr), "test_fortunes": len(te)} for c, (tr, te) in splits.items()}


if __name__ == "__main__":  # python benchmarks/data_fortunes.py: counts of every category
    for name in list_categories():
        print(f"{name:15s} {len(read_category(name)):5d}")
