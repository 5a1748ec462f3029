"""SentencePiece tokenizers with the contest's recipe, and the per-token byte tables that val_bpb needs.

Byte accounting (BRIEF §1): control, unknown and unused pieces are *boundary* tokens worth 0 bytes; byte-fallback
pieces ``<0xNN>`` are worth 1 byte; any other piece is worth the UTF-8 length of its text without a leading ``▁``,
plus 1 byte for that ``▁`` only when the previous token is not a boundary token (after BOS the space is not text).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm
import torch

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SPACE = "\u2581"  # SentencePiece's visible space "▁"

# The official recipe (openai/parameter-golf data/): only these fields differ from SentencePiece's defaults.
OFFICIAL_RECIPE = dict(model_type="bpe", byte_fallback=True, split_digits=True, normalization_rule_name="nmt_nfkc",
                       add_dummy_prefix=False, hard_vocab_limit=False, character_coverage=0.999,
                       pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID)

# SentencePiece drops training sentences longer than this many bytes; we cut long lines instead.
_MAX_SENTENCE_CHARS = 4000


def _training_sentences(documents: Iterable[str], max_sentences: int) -> Iterator[str]:
    """Lines of the documents (the recipe's nmt_nfkc turns newlines into spaces anyway), long lines cut."""
    count = 0
    for doc in documents:
        for line in doc.replace("\x00", " ").split("\n"):
            line = line.strip()
            while line:
                yield line[:_MAX_SENTENCE_CHARS]
                line = line[_MAX_SENTENCE_CHARS:]
                count += 1
                if count >= max_sentences:
                    return


def train_tokenizer(documents: Iterable[str], out_path: str | os.PathLike, vocab_size: int = 1024,
                    max_sentences: int = 2_000_000, num_threads: int | None = None) -> Path:
    """Train a BPE tokenizer with the official recipe on ``documents``; write it to ``out_path`` (atomically).

    Training reads at most ``max_sentences`` lines, which bounds its time on large corpora.
    """
    if vocab_size < 8 or vocab_size > 65536:
        raise ValueError(f"vocab_size={vocab_size} must lie in [8, 65536] (shards store uint16 ids)")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".spm-") as tmp:
        prefix = Path(tmp) / "tok"
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_training_sentences(documents, max_sentences), model_prefix=str(prefix),
                vocab_size=vocab_size, num_threads=num_threads or os.cpu_count() or 1,
                input_sentence_size=max_sentences, shuffle_input_sentence=True, minloglevel=2, **OFFICIAL_RECIPE)
        except RuntimeError as exc:  # e.g. a vocabulary smaller than 4 specials + 256 bytes + the corpus's characters
            raise ValueError(f"tokenizer training (vocab_size={vocab_size}) failed: {exc}") from None
        shutil.move(str(prefix.with_suffix(".model")), out_path)
    return out_path


def load_tokenizer(tokenizer: str | os.PathLike | spm.SentencePieceProcessor) -> spm.SentencePieceProcessor:
    if isinstance(tokenizer, spm.SentencePieceProcessor):
        return tokenizer
    path = Path(tokenizer)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {path}: no such file")
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except Exception as exc:  # sentencepiece raises a bare RuntimeError/OSError with little context
        raise ValueError(f"tokenizer {path}: not a SentencePiece model ({exc})") from exc


@dataclass(frozen=True)
class ByteTables:
    """Per token id: bytes without a leading space, whether it has one, whether it is a boundary token."""

    base_bytes: torch.Tensor  # int16 [V]
    has_leading_space: torch.Tensor  # bool [V]
    is_boundary: torch.Tensor  # bool [V]

    @property
    def vocab_size(self) -> int:
        return self.base_bytes.numel()

    def to(self, device: torch.device | str) -> "ByteTables":
        return ByteTables(self.base_bytes.to(device), self.has_leading_space.to(device), self.is_boundary.to(device))


def build_byte_tables(tokenizer: str | os.PathLike | spm.SentencePieceProcessor,
                      vocab_size: int | None = None) -> ByteTables:
    """Byte tables for every id below ``max(vocab_size, tokenizer size)``; ids beyond the tokenizer are unused."""
    sp = load_tokenizer(tokenizer)
    n = max(sp.vocab_size(), vocab_size or 0)
    base = torch.zeros(n, dtype=torch.int16)
    space = torch.zeros(n, dtype=torch.bool)
    boundary = torch.ones(n, dtype=torch.bool)
    for i in range(sp.vocab_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith(SPACE):
            space[i] = True
            piece = piece[1:]
        base[i] = len(piece.encode("utf-8"))
    return ByteTables(base, space, boundary)
