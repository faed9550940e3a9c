"""Load an HF tokenizer directory, or train a byte-level BPE one, and encode text with it.

The encoder runs in `prepare`'s worker processes, so it loads from a directory
(cheap to pass between processes) rather than being pickled.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from sharding.errors import DataError
from sharding.manifest import MASK_START, MASK_TARGET, sha256_dir

EOS_TOKEN = "<|endoftext|>"
# Tried in order when tokenizer_config.json names no eos_token.
_EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "[SEP]")
_BYTE_ALPHABET = 256


@dataclass(frozen=True)
class TokenizerInfo:
    """What prepare needs to know about a tokenizer; `fast` means `tokenizer.json` exists."""

    dir: Path
    name: str
    vocab_size: int
    eos_id: int
    fast: bool

    def sha256(self) -> str:
        """Hash over the tokenizer directory's files (names and contents)."""
        return sha256_dir(self.dir)


def _eos_name_from_config(tok_dir: Path) -> str | None:
    cfg = tok_dir / "tokenizer_config.json"
    if not cfg.is_file():
        return None
    try:
        eos = json.loads(cfg.read_text(encoding="utf-8")).get("eos_token")
    except (ValueError, OSError):
        return None
    if isinstance(eos, dict):  # AddedToken serialised as {"content": ...}
        eos = eos.get("content")
    return eos if isinstance(eos, str) else None


def load_tokenizer_info(path: str | Path) -> TokenizerInfo:
    """Inspect an HF tokenizer dir: vocab size (with added tokens) and the EOS id."""
    tok_dir = Path(path).resolve()
    if not tok_dir.is_dir():
        raise DataError(f"{path}: tokenizer is not a directory — pass an HF tokenizer dir")
    if (tok_dir / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise DataError(f"{tok_dir}/tokenizer.json: cannot load ({e})") from e
        vocab_size = tok.get_vocab_size(with_added_tokens=True)
        names = [n for n in (_eos_name_from_config(tok_dir), *_EOS_CANDIDATES) if n]
        eos_id = next((i for i in map(tok.token_to_id, names) if i is not None), None)
        fast = True
    else:
        auto = _auto_tokenizer(tok_dir)
        vocab_size, eos_id, fast = len(auto), auto.eos_token_id, False
    if eos_id is None:
        raise DataError(f"{tok_dir}: tokenizer has no EOS token — set eos_token in its config")
    return TokenizerInfo(tok_dir, tok_dir.name, int(vocab_size), int(eos_id), fast)


def _auto_tokenizer(tok_dir: Path):  # -> transformers.PreTrainedTokenizerBase
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    except Exception as e:  # transformers raises many types for a bad dir
        raise DataError(f"{tok_dir}: not a loadable HF tokenizer dir ({e})") from e


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: Path) -> TokenizerInfo:
    """Train a byte-level BPE on `texts` and save it as an HF tokenizer dir in `out_dir`.

    `<|endoftext|>` is id 0 and serves as EOS, BOS and UNK (GPT-2 convention).
    The config files are written by hand (no transformers import) and load with
    `transformers.AutoTokenizer.from_pretrained`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size <= _BYTE_ALPHABET + 1:
        raise DataError(
            f"--train-tokenizer {vocab_size}: vocab must be > {_BYTE_ALPHABET + 1}"
            " (256 bytes + <|endoftext|>)"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    special = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 30,
    }
    for name, obj in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        (out_dir / name).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    return replace(load_tokenizer_info(out_dir), name=f"byte-level-bpe-{vocab_size}")


def read_token_list(spec: str | list[str]) -> list[str]:
    """Tokens to add: a list, a comma-separated string, or a file with one token per line."""
    if isinstance(spec, list):
        tokens = spec
    elif os.path.isfile(spec):
        tokens = Path(spec).read_text(encoding="utf-8").splitlines()
    elif "," not in spec and ("/" in spec or Path(spec).suffix in (".txt", ".lst", ".tokens")):
        raise DataError(f"--add-tokens {spec}: no such file (or give tokens comma-separated)")
    else:
        tokens = spec.split(",")
    tokens = [t.strip() for t in tokens if t.strip()]
    if not tokens:
        raise DataError(f"--add-tokens {spec!r}: no tokens given")
    return list(dict.fromkeys(tokens))  # de-duplicated, order kept


def add_tokens(source: TokenizerInfo, tokens: list[str], out_dir: Path) -> TokenizerInfo:
    """Copy the tokenizer to `out_dir` with `tokens` added as whole (non-special) tokens.

    An added token always encodes as one id, wherever it occurs in the text.
    Tokens the vocabulary already has keep their ids.
    """
    from tokenizers import AddedToken, Tokenizer

    if not source.fast:
        raise DataError(f"{source.dir}: --add-tokens needs a fast tokenizer (tokenizer.json)")
    if source.dir.resolve() != out_dir.resolve():
        shutil.copytree(source.dir, out_dir, dirs_exist_ok=True)
    tok = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    tok.add_tokens([AddedToken(t, normalized=False) for t in tokens])
    tok.save(str(out_dir / "tokenizer.json"))
    return replace(load_tokenizer_info(out_dir), name=f"{source.name}+{len(tokens)}")


class Encoder:
    """Text batch -> flat token arrays for train and val, with EOS after each finished document.

    With `masked`, also a uint8 loss mask per split, aligned with the tokens:
    MASK_TARGET where a token is a loss target (a counted segment, and the EOS
    ending it), MASK_START on the first token of each record. A masked job starts
    at a record boundary. `special_tokens` lets special tokens written in the text
    (by a chat template) encode as their ids; otherwise text is always just text.
    """

    def __init__(
        self,
        tok_dir: str,
        fast: bool,
        dtype: str,
        eos_id: int,
        masked: bool = False,
        special_tokens: bool = False,
    ):
        self.dtype, self.eos_id, self.fast, self.masked = np.dtype(dtype), eos_id, fast, masked
        self.special_tokens = special_tokens
        if fast:
            from tokenizers import Tokenizer

            self.tok = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
            # Literal "<|endoftext|>" inside a document is text, not a separator:
            # EOS ids in the shards must only come from document ends.
            self.tok.encode_special_tokens = not special_tokens
        else:
            self.tok = _auto_tokenizer(Path(tok_dir))

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens."""
        if self.fast:
            # encode_batch_fast (tokenizers >= 0.21) skips the offsets we never use.
            encode = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)
            return [e.ids for e in encode(texts, add_special_tokens=False)]
        split = not self.special_tokens
        out = self.tok(texts, add_special_tokens=False, split_special_tokens=split)
        return out["input_ids"]

    def __call__(
        self, texts: list[str], ends: list[bool], val: list[bool], counted: list[bool]
    ) -> Encoded:
        """Encode; `ends[i]`: text i finishes its document; `val[i]`: it goes to the val
        split; `counted[i]`: its tokens (and the EOS after it) are loss targets."""
        streams: tuple[list[int], list[int]] = ([], [])
        masks: tuple[list[int], list[int]] = ([], [])
        at_start = True
        for ids, end, is_val, count in zip(self.encode(texts), ends, val, counted, strict=True):
            out = streams[is_val]
            out += ids
            if end:
                out.append(self.eos_id)
            if self.masked:
                bits = [MASK_TARGET if count else 0] * (len(ids) + end)
                if at_start and bits:
                    bits[0] |= MASK_START
                    at_start = False
                masks[is_val].extend(bits)
            at_start = at_start or end
        train, val_tokens = (np.array(x, self.dtype) for x in streams)
        if not self.masked:
            return train, val_tokens, None, None
        return train, val_tokens, np.array(masks[0], np.uint8), np.array(masks[1], np.uint8)


# (train tokens, val tokens, train loss mask, val loss mask); masks None for plain text.
Encoded = tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]

# Per-process encoder for the multiprocessing pool (spawned workers).
_WORKER_ENCODER: Encoder | None = None


def init_worker(
    tok_dir: str, fast: bool, dtype: str, eos_id: int, masked: bool, special_tokens: bool
) -> None:
    """Pool initializer: one single-threaded encoder per worker process."""
    global _WORKER_ENCODER
    # Parallelism comes from the worker processes; Rust threads inside each would
    # oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER_ENCODER = Encoder(tok_dir, fast, dtype, eos_id, masked, special_tokens)


def encode_job(job: tuple[list[str], list[bool], list[bool], list[bool]]) -> Encoded:
    """Pool task: encode one batch with this worker's encoder."""
    assert _WORKER_ENCODER is not None, "init_worker was not run"
    return _WORKER_ENCODER(*job)
