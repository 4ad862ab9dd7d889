"""Token windows from a flat token file, read by memory map.

A token file is a 1-D ``.npy`` array, or a raw ``.bin`` of little-endian
integers (``dtype``, uint16 by default).  It is cut into windows of
``seq_len + 1`` tokens starting every ``seq_len`` tokens (consecutive windows
share one token, so every token is a target once per epoch).  Each epoch
visits the windows in a permutation drawn from ``(seed, epoch)``; a position
(windows consumed so far) is all the state there is, so resuming is exact.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hexjax.errors import ConfigError


def open_tokens(path, dtype: str = "uint16") -> np.ndarray:
    """The token file as a read-only 1-D memory map."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such token file (give a 1-D .npy array or a raw .bin of token ids)")
    if path.suffix == ".npy":
        arr = np.load(path, mmap_mode="r")
    else:
        try:
            arr = np.memmap(path, dtype=np.dtype(dtype).newbyteorder("<"), mode="r")
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{path}: cannot read as {dtype} tokens ({e})") from None
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ConfigError(f"{path}: expected a 1-D array of integer token ids, got shape {arr.shape} {arr.dtype}")
    return arr


class TokenWindows:
    """Shuffled ``[batch, seq_len + 1]`` windows of a token array (see the module docstring)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int = 0):
        if seq_len < 1:
            raise ConfigError(f"seq_len must be at least 1, got {seq_len}")
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.num_windows = max((len(tokens) - 1) // seq_len, 0)
        if self.num_windows == 0:
            raise ConfigError(f"the token file has {len(tokens)} tokens, fewer than one window of "
                              f"seq_len + 1 = {seq_len + 1}")
        self._perm: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm:
            self._perm = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)}
        return self._perm[epoch]

    def batch(self, position: int, batch: int) -> np.ndarray:
        """Windows ``position .. position + batch - 1`` of the shuffled stream, as int32 [batch, seq_len + 1]."""
        out = np.empty((batch, self.seq_len + 1), np.int32)
        for i in range(batch):
            epoch, j = divmod(position + i, self.num_windows)
            start = int(self._order(epoch)[j]) * self.seq_len
            out[i] = self.tokens[start:start + self.seq_len + 1]
        return out


# ----------------------------------------------------------------------------- text data

TOKEN_SUFFIXES = (".npy", ".bin")
TEXT_SUFFIXES = (".txt",)
EOT = "<|endoftext|>"


def text_files(path) -> list[Path]:
    """The text files of ``--data``: the file itself, or a folder's ``*.txt`` (recursively, sorted)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise ConfigError(f"{path}: the folder holds no .txt files (give a folder of .txt files, a .txt file, "
                              "or a token file: a 1-D .npy array or a raw .bin of token ids)")
        return files
    if not path.exists():
        raise ConfigError(f"{path}: no such data file (give a .txt file, a folder of .txt files, "
                          "a 1-D .npy array or a raw .bin of token ids)")
    if path.suffix not in TEXT_SUFFIXES:
        raise ConfigError(f"{path}: unknown data file extension {path.suffix or '(none)'!r}; give a .txt file, "
                          "a folder of .txt files, a 1-D .npy array or a raw .bin of token ids")
    return [path]


def is_text_data(path) -> bool:
    """Whether ``--data`` names text (a .txt file or a folder) rather than a token file; raises
    ``ConfigError`` for a missing path or an unknown extension."""
    path = Path(path)
    if path.is_dir():
        return True
    if path.suffix in TOKEN_SUFFIXES:
        return False           # open_tokens says so when it is missing
    if not path.exists():
        raise ConfigError(f"{path}: no such data file (give a .txt file, a folder of .txt files, "
                          "a 1-D .npy array or a raw .bin of token ids)")
    text_files(path)   # raises for an unknown extension
    return True


def train_tokenizer(files: list[Path], vocab_size: int):
    """A byte-level BPE (Hugging Face ``tokenizers``) trained on ``files`` with at most ``vocab_size`` ids.

    Adds an ``<|endoftext|>`` token between documents when the vocabulary has room beyond the 256 bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    if vocab_size < 256:
        raise ConfigError(f"the model's vocabulary ({vocab_size}) is smaller than the 256 bytes of a byte-level "
                          "BPE; give --tokenizer with a tokenizer.json of at most that many ids")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = [EOT] if vocab_size > 256 else []
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(f) for f in files], trainer)
    if tok.get_vocab_size() > vocab_size:   # cannot happen with the full byte alphabet, but check
        raise ConfigError(f"the trained tokenizer has {tok.get_vocab_size()} ids, more than the model's {vocab_size}")
    return tok


def load_tokenizer(path):
    """A Hugging Face ``tokenizers`` tokenizer from a ``tokenizer.json``."""
    from tokenizers import Tokenizer
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such tokenizer file (give a Hugging Face tokenizer.json)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - the library raises plain Exceptions
        raise ConfigError(f"{path}: cannot read as a Hugging Face tokenizer.json ({e})") from None


def _fingerprint(files: list[Path], tokenizer) -> str:
    import hashlib
    h = hashlib.sha256(tokenizer.to_str().encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:16]


def tokenize_text(files: list[Path], tokenizer, cache_dir, vocab_size: int | None = None) -> Path:
    """Tokenize ``files`` once into ``cache_dir/tokens-<hash>.npy`` (the hash covers the files' paths,
    sizes, mtimes and the tokenizer) and return its path; documents are joined with ``<|endoftext|>``
    when the tokenizer has it. Raises ``ConfigError`` when an id reaches ``vocab_size``."""
    cache_dir = Path(cache_dir)
    out = cache_dir / f"tokens-{_fingerprint(files, tokenizer)}.npy"
    if out.is_file():
        return out
    eot = tokenizer.token_to_id(EOT)
    parts = []
    for i, f in enumerate(files):
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{f}: not UTF-8 text ({e})") from None
        lines = text.splitlines(keepends=True)
        chunks = ["".join(lines[j:j + 4096]) for j in range(0, len(lines), 4096)]
        for enc in tokenizer.encode_batch(chunks, add_special_tokens=False) if chunks else []:
            parts.append(np.asarray(enc.ids, np.int64))
        if eot is not None and i < len(files) - 1:
            parts.append(np.asarray([eot], np.int64))
    ids = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if vocab_size is not None and ids.size and int(ids.max()) >= vocab_size:
        raise ConfigError(f"the tokenizer produced id {int(ids.max())}, outside the model's vocabulary of "
                          f"{vocab_size}; use a tokenizer with at most {vocab_size} ids")
    dtype = np.uint16 if (ids.max(initial=0) < 2 ** 16) else np.uint32
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / (out.stem + ".partial.npy")
    np.save(tmp, ids.astype(dtype))
    tmp.replace(out)
    return out


def prepare_text(path, tokenizer_path=None, vocab_size: int | None = None, cache_dir=None,
                 save_tokenizer_to=()) -> tuple[Path, Path | None]:
    """Text ``--data`` as a cached token ``.npy``: returns ``(tokens_path, trained_tokenizer_path)``.

    With ``tokenizer_path`` that tokenizer is used; otherwise a byte-level BPE of at most ``vocab_size``
    ids is trained on the text and written as ``tokenizer.json`` into every folder of
    ``save_tokenizer_to`` (the first is returned). ``cache_dir`` defaults to ``.hexjax-tokens`` beside the data."""
    files = text_files(path)
    path = Path(path)
    if cache_dir is None:
        cache_dir = (path if path.is_dir() else path.parent) / ".hexjax-tokens"
    trained = None
    if tokenizer_path is not None:
        tok = load_tokenizer(tokenizer_path)
        if vocab_size is not None and tok.get_vocab_size() > vocab_size:
            raise ConfigError(f"{tokenizer_path}: the tokenizer has {tok.get_vocab_size()} ids, more than the "
                              f"model's vocabulary of {vocab_size}")
    else:
        if vocab_size is None:
            raise ConfigError("text data needs --tokenizer or a model vocabulary size to train one")
        tok = train_tokenizer(files, vocab_size)
        for d in list(save_tokenizer_to) or [cache_dir]:
            d = Path(d)
            d.mkdir(parents=True, exist_ok=True)
            tok.save(str(d / "tokenizer.json"))
            trained = trained or d / "tokenizer.json"
    return tokenize_text(files, tok, cache_dir, vocab_size), trained
