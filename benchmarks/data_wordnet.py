"""An offline English corpus for language-model pretraining: WordNet's glosses (Debian's `wordnet-base`).

Each synset line of /usr/share/wordnet/data.{noun,verb,adj,adv} ends with "| gloss": a definition, often with
quoted example sentences ("a bird that ...; \"the sparrow sang\""). The glosses are English prose, about 117k
of them (about 1.7M words). They are shuffled with a seed and split by gloss into train and validation text
before tokenisation, so no gloss is on both sides. Tokens: bytes (a vocabulary of 256; no tokenizer files are
needed offline).
"""
from __future__ import annotations

import os
import random

import torch

WORDNET_DIR = "/usr/share/wordnet"
INSTALL_HINT = "apt-get install -y wordnet-base"
PARTS = ("noun", "verb", "adj", "adv")


def wordnet_available(directory: str = WORDNET_DIR) -> bool:
    return all(os.path.isfile(os.path.join(directory, f"data.{p}")) for p in PARTS)


def glosses(directory: str = WORDNET_DIR) -> list[str]:
    if not wordnet_available(directory):
        raise FileNotFoundError(f"WordNet's data files are not in {directory}; install them with: {INSTALL_HINT}")
    out = []
    for part in PARTS:
        with open(os.path.join(directory, f"data.{part}"), encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("  ") or "|" not in line:
                    continue  # the licence header
                gloss = line.split("|", 1)[1].strip()
                if gloss:
                    out.append(gloss)
    return out


def byte_splits(seed: int = 0, val_frac: float = 0.05, directory: str = WORDNET_DIR) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) byte streams (uint8 tensors): the glosses, shuffled with `seed`, split by gloss, each
    ended by a newline."""
    items = glosses(directory)
    random.Random(seed).shuffle(items)
    n_val = max(1, int(len(items) * val_frac))
    encode = lambda texts: torch.frombuffer(bytearray("\n".join(texts).encode("utf-8") + b"\n"), dtype=torch.uint8)
    return encode(items[n_val:]), encode(items[:n_val])


def batches(stream: torch.Tensor, batch: int, seq: int, generator: torch.Generator) -> torch.Tensor:
    """[batch, seq + 1] random windows of the stream (inputs and next-byte targets), as int64."""
    starts = torch.randint(0, stream.numel() - seq - 1, (batch,), generator=generator)
    return torch.stack([stream[s:s + seq + 1] for s in starts.tolist()]).long()
