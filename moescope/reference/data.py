"""Real text every machine has: the Python standard library's own source, as English and as code.

English is the docstrings and comments; code is everything else. Tokens are bytes (vocab 256).
Nothing is downloaded. The file list is sorted, then shuffled with a seed, and split by file, so
train and eval never share a file and the same seed gives the same splits on the same Python.
"""

from __future__ import annotations

import ast
import functools
import io
import os
import random
import sysconfig
import tokenize
from dataclasses import dataclass
from pathlib import Path

import torch

#: Folders of the stdlib that are not the library itself (third-party packages, huge test suites).
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3"}


@dataclass(frozen=True)
class Corpus:
    """Byte tensors (uint8) of each domain and split, and the files they came from."""

    english_train: torch.Tensor
    english_eval: torch.Tensor
    code_train: torch.Tensor
    code_eval: torch.Tensor
    train_files: tuple[str, ...]
    eval_files: tuple[str, ...]

    def split(self, domain: str, split: str) -> torch.Tensor:
        """The byte tensor of `domain` ("english"|"code") and `split` ("train"|"eval")."""
        if domain not in ("english", "code") or split not in ("train", "eval"):
            raise ValueError(f"unknown domain/split {domain!r}/{split!r}")
        return getattr(self, f"{domain}_{split}")


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """All .py files of the standard library (sorted, without site-packages and test suites)."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(base):
        # prune in place: site-packages can be far larger than the standard library itself
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        files.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(base).as_posix())


def split_source(source: str) -> tuple[str, str]:
    """Split Python source into (english: docstrings and comments, code: the rest without them)."""
    lines = source.splitlines()
    drop_rows: set[int] = set()  # 1-based rows that belong to a docstring
    cut_at: dict[int, int] = {}  # row -> column where a trailing comment starts
    english: list[str] = []
    prev = tokenize.NEWLINE
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                text = tok.string.lstrip("#").strip()
                if text and not text.startswith("!") and "-*-" not in text:  # skip shebangs, coding lines
                    english.append(text)
                cut_at[tok.start[0]] = tok.start[1]
            elif tok.type == tokenize.STRING and prev in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
                # a string that starts a logical line is an expression statement: a docstring
                doc = _docstring_text(tok.string)
                if doc is not None:
                    english.append(doc)
                    drop_rows.update(range(tok.start[0], tok.end[0] + 1))
            if tok.type not in (tokenize.NL, tokenize.COMMENT):
                prev = tok.type
    except (tokenize.TokenError, SyntaxError):  # a few stdlib files are deliberately odd; keep what we read
        pass
    code_lines = []
    for row, line in enumerate(lines, start=1):
        if row in drop_rows:
            continue
        line = line[: cut_at[row]].rstrip() if row in cut_at else line.rstrip()
        if line.strip() or (code_lines and code_lines[-1]):  # collapse runs of blank lines
            code_lines.append(line)
    return "\n".join(english) + "\n", "\n".join(code_lines) + "\n"


def _docstring_text(literal: str) -> str | None:
    try:
        value = ast.literal_eval(literal)
    except (ValueError, SyntaxError, MemoryError):
        return None
    if not isinstance(value, str):
        return None
    # doctest lines are code inside prose; leave them out so "english" stays prose
    kept = [ln.strip() for ln in value.splitlines() if not ln.strip().startswith((">>>", "..."))]
    text = "\n".join(ln for ln in kept if ln)
    return text or None


@functools.lru_cache(maxsize=4)
def load_corpus(max_bytes: int = 1_200_000, eval_fraction: float = 0.1, seed: int = 0) -> Corpus:
    """Read up to `max_bytes` of stdlib source (seeded file order) and split it by file and domain."""
    files = stdlib_files()
    random.Random(seed).shuffle(files)  # deterministic: the list was sorted first
    eval_files: list[Path] = []
    train_files: list[Path] = []
    eval_bytes = train_bytes = 0
    for p in files:
        if eval_bytes + train_bytes >= max_bytes:
            break
        size = p.stat().st_size
        if size > max_bytes // 4:  # one giant file would dominate the corpus
            continue
        # the first files (in seeded order) fill the eval split up to its share of bytes, the rest train
        if eval_bytes < eval_fraction * max_bytes:
            eval_files.append(p)
            eval_bytes += size
        else:
            train_files.append(p)
            train_bytes += size

    def encode(paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
        eng, code = [], []
        for p in paths:
            e, c = split_source(p.read_text(encoding="utf-8", errors="replace"))
            eng.append(e)
            code.append(c)
        return _to_bytes("".join(eng)), _to_bytes("".join(code))

    e_tr, c_tr = encode(train_files)
    e_ev, c_ev = encode(eval_files)
    base = Path(sysconfig.get_paths()["stdlib"])
    return Corpus(
        english_train=e_tr,
        english_eval=e_ev,
        code_train=c_tr,
        code_eval=c_ev,
        train_files=tuple(p.relative_to(base).as_posix() for p in train_files),
        eval_files=tuple(p.relative_to(base).as_posix() for p in eval_files),
    )


def _to_bytes(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).clone()


def get_batch(
    data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of `data`: (input_ids [B, S] int64, labels [B, S] int64, equal to input_ids)."""
    starts = torch.randint(0, data.numel() - seq_len, (batch_size,), generator=generator)  # [B]
    idx = starts[:, None] + torch.arange(seq_len)[None, :]  # [B, S]
    x = data[idx].long()
    return x, x  # the model shifts labels itself


def fixed_batch(data: torch.Tensor, batch_size: int, seq_len: int, seed: int = 1234) -> torch.Tensor:
    """A fixed evaluation batch [B, S] (same windows every call for the same seed)."""
    gen = torch.Generator().manual_seed(seed)
    return get_batch(data, batch_size, seq_len, gen)[0]
