"""Text for training and evaluation: user files or the built-in corpus, as byte tokens.

The built-in corpus is text that ships with every CPython: the documentation topics in
`pydoc_data` and the standard library's own source. Each document is assigned to train or
validation by a hash of its name, so the split is fixed. The validation text used for the
default checkpoint ships inside the package (`bundled/validation.txt`) so that evaluations are
identical on every machine and Python version.

User data (`--data`) is read in bounded pieces: evaluation reads only the bytes its windows
need (with another tokenizer, `read_tokens` reads a prefix that holds enough tokens), training
at most `MAX_TRAIN_BYTES`. Text must be UTF-8: a NUL byte marks a binary file
(an error); other invalid UTF-8 bytes become U+FFFD, as `errors="replace"` decodes them.
"""

from __future__ import annotations

import sysconfig
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from mnm_search.errors import DataError

VOCAB_SIZE = 256  # byte-level tokens
DATA_SUFFIXES = (".txt", ".md", ".py")
# Training holds its text as one byte per token; 512 MiB is ~half a billion training tokens,
# more than any run here sees, and bounds memory whatever file is passed.
MAX_TRAIN_BYTES = 512 * 1024 * 1024
# Evaluation without a token budget reads at most this much (16M tokens is hours of eval).
MAX_EVAL_BYTES = 16 * 1024 * 1024
# Bytes read beyond what is needed, so that a UTF-8 character cut by the limit lies past it.
_UTF8_MARGIN = 4
# For tokenizers (`read_tokens`): text read per token wanted at first (see there), and tokens
# read past those wanted. A read ends mid-word, which can change the last few tokens (a long
# token cut in two, a character cut into U+FFFD); they fall in this margin, never in a window.
_BYTES_PER_TOKEN_GUESS = 8
_TOKEN_MARGIN = 64
_VALIDATION_SHARE = 20  # one document in this many goes to validation
_SKIP_DIRS = {
    "site-packages",
    "dist-packages",
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "__pycache__",
}


def encode(text: str) -> torch.Tensor:
    """UTF-8 bytes as int64 token ids."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def decode(tokens: torch.Tensor) -> str:
    return bytes(tokens.to(torch.uint8).tolist()).decode("utf-8", errors="replace")


def _is_validation(name: str) -> bool:
    return zlib.crc32(name.encode("utf-8")) % _VALIDATION_SHARE == 0


def builtin_documents() -> Iterator[tuple[str, str]]:
    """(name, text) for every document of the built-in corpus, in a fixed order."""
    from pydoc_data import topics

    for key in sorted(topics.topics):
        yield f"pydoc:{key}", topics.topics[key]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        relative = path.relative_to(stdlib)
        if _SKIP_DIRS.intersection(relative.parts[:-1]):
            continue
        try:
            yield f"stdlib:{relative.as_posix()}", path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue


def builtin_split(*, max_validation_chars: int = 200_000) -> tuple[str, str]:
    """(train text, validation text) of the built-in corpus; validation capped in size."""
    train_parts: list[str] = []
    validation_parts: list[str] = []
    validation_chars = 0
    for name, text in builtin_documents():
        if _is_validation(name) and validation_chars < max_validation_chars:
            validation_parts.append(text)
            validation_chars += len(text)
        elif not _is_validation(name):
            train_parts.append(text)
    return "\n".join(train_parts), "\n".join(validation_parts)[:max_validation_chars]


def bundled_validation_text() -> str:
    """The validation text that ships inside the package."""
    return resources.files("mnm_search").joinpath("bundled/validation.txt").read_text("utf-8")


def _data_files(path: Path) -> list[Path]:
    """The file, or every `*.txt`/`*.md`/`*.py` file under the directory, sorted."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in DATA_SUFFIXES and p.is_file())
        if not files:
            raise DataError(
                f"no {', '.join(DATA_SUFFIXES)} files under {path}; pass a text file or a "
                f"directory of them"
            )
        return files
    if path.is_file():
        return [path]
    raise DataError(f"data path {path} does not exist")


def read_text_data(path: str | Path, *, max_bytes: int = MAX_TRAIN_BYTES) -> str:
    """Text of a file, or of every `*.txt`/`*.md`/`*.py` file under a directory, sorted.

    Reads at most `max_bytes` bytes (files of a directory joined by newlines, in order); the
    rest is never read. Refuses binary data (NUL bytes); invalid UTF-8 becomes U+FFFD.
    """
    path = Path(path)
    files = _data_files(path)
    parts: list[str] = []
    remaining = max_bytes
    for file in files:
        if remaining <= 0:
            break
        try:
            with file.open("rb") as handle:
                raw = handle.read(remaining)
        except OSError as exc:
            raise DataError(f"cannot read data file {file}: {exc}") from exc
        nul = raw.find(b"\x00")
        if nul >= 0:
            raise DataError(
                f"data file {file} holds a NUL byte at offset {nul}, so it is binary, not "
                f"text; pass UTF-8 text files (.txt, .md, .py)"
            )
        parts.append(raw.decode("utf-8", errors="replace"))
        remaining -= len(raw) + 1  # +1: the newline that joins files
    text = "\n".join(parts)
    if not text.strip():
        raise DataError(f"data path {path} holds no text")
    return text


def _data_bytes(path: Path) -> int:
    """How many bytes `read_text_data` reads from PATH without a limit (newlines included)."""
    try:
        return sum(file.stat().st_size + 1 for file in _data_files(path))
    except OSError as exc:
        raise DataError(f"cannot read data {path}: {exc}") from exc


def read_tokens(
    path: str | Path,
    encode: Callable[[str], torch.Tensor],
    *,
    n_tokens: int | None,
    max_bytes: int = MAX_EVAL_BYTES,
) -> torch.Tensor:
    """Tokens (by ENCODE, any tokenizer) of the text at PATH, reading only a prefix of it.

    Reads until the tokens number at least `n_tokens` plus a margin, the text ends, or
    `max_bytes` were read (without `n_tokens`: up to `max_bytes`), so a large file is
    neither read whole nor tokenized whole.
    """
    path = Path(path)
    limit = min(max_bytes, _data_bytes(path))
    if n_tokens is None:
        return encode(read_text_data(path, max_bytes=limit))
    # How many bytes a token covers is up to the tokenizer: about 4 for subword vocabularies
    # on prose, up to dozens for their longest tokens (runs of spaces in code), 1 for bytes.
    # Start at twice the usual and double while short: at most ~2x the bytes needed are
    # tokenized, whatever the tokenizer.
    budget = min(limit, (n_tokens + _TOKEN_MARGIN) * _BYTES_PER_TOKEN_GUESS)
    while True:
        tokens = encode(read_text_data(path, max_bytes=budget))
        if tokens.numel() >= n_tokens + _TOKEN_MARGIN or budget >= limit:
            return tokens
        budget = min(limit, 2 * budget)


def window_tokens(*, seq_len: int, max_tokens: int) -> int:
    """Tokens that `make_eval_set` keeps for a budget of `max_tokens`: whole windows."""
    return max(1, max_tokens // seq_len) * (seq_len + 1)


@dataclass(frozen=True)
class EvalSet:
    """Fixed evaluation batches: non-overlapping windows of `seq_len + 1` tokens."""

    inputs: torch.Tensor  # [n_windows, seq_len]
    targets: torch.Tensor  # [n_windows, seq_len]

    @property
    def n_tokens(self) -> int:
        return self.targets.numel()


def make_eval_set(tokens: torch.Tensor, *, seq_len: int, max_tokens: int | None = None) -> EvalSet:
    """Cut `tokens` into windows; each window predicts its own next tokens."""
    window = seq_len + 1
    n_windows = tokens.numel() // window
    if max_tokens is not None:
        n_windows = min(n_windows, max(1, max_tokens // seq_len))
    if n_windows == 0:
        raise DataError(
            f"evaluation text has {tokens.numel()} tokens; at least {window} are needed "
            f"for one window of seq_len={seq_len}"
        )
    windows = tokens[: n_windows * window].view(n_windows, window)  # [N, seq_len + 1]
    return EvalSet(inputs=windows[:, :-1].contiguous(), targets=windows[:, 1:].contiguous())


def load_eval_set(
    data: str | Path | None, *, seq_len: int, max_tokens: int | None = None
) -> EvalSet:
    """Evaluation set from a user's text file or directory, or the bundled validation text."""
    if data is None:
        text = bundled_validation_text()
    else:
        # Byte-level tokens: the windows need exactly this many bytes, so read only those.
        needed = MAX_EVAL_BYTES
        if max_tokens is not None:
            needed = min(needed, window_tokens(seq_len=seq_len, max_tokens=max_tokens))
        text = read_text_data(data, max_bytes=needed + _UTF8_MARGIN)
    return make_eval_set(encode(text), seq_len=seq_len, max_tokens=max_tokens)


def sample_batch(
    tokens: torch.Tensor, *, batch_size: int, seq_len: int, seed: int, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random training windows for `step`, determined only by (seed, step).

    Tying the draw to the step (not to a running generator) is what makes a resumed run see
    exactly the data order an uninterrupted run would have seen.
    """
    if tokens.numel() <= seq_len + 1:
        raise DataError(
            f"training text has {tokens.numel()} tokens; more than {seq_len + 1} are needed"
        )
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, tokens.numel() - seq_len - 1, (batch_size,), generator=generator)
    offsets = torch.arange(seq_len + 1)
    # Long ids for the model, also when the text is held as one byte per token.
    windows = tokens[starts[:, None] + offsets[None, :]].long()  # [B, seq_len + 1]
    return windows[:, :-1], windows[:, 1:]
