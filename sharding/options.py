"""`PrepareOptions`: what a prepared dataset is made from, besides its inputs.

Each option's default, help text and `gptrain prepare` flag are written here once:
`prepare`, the sliced prepare (its plan.json) and the command line are built from
this dataclass. How a prepare runs (`workers`, `progress`, `--tasks`, `--backend`)
changes no output byte and is an argument of the calls, not an option.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from sharding.errors import DataError
from sharding.sources import KINDS, RecordFormat

CHAT_TEMPLATES = ("auto", "builtin", "tokenizer")
ERRORS = ("strict", "replace")
_RECORD = RecordFormat()  # the record keys' defaults live with the record format


def _option(
    default: Any,
    help: str,
    *,
    type: type = str,
    flag: str | None = None,
    metavar: str | None = None,
    choices: tuple[str, ...] | None = None,
) -> Any:
    """A field with its CLI flag (default: --field-name), type, metavar, choices and help."""
    meta = {"help": help, "type": type, "flag": flag, "metavar": metavar, "choices": choices}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class PrepareOptions:
    """The options of `gptrain prepare` (see `check` for what each accepts)."""

    tokenizer: str | None = _option(None, "HF tokenizer directory")
    train_tokenizer_vocab: int | None = _option(
        None,
        "train a byte-level BPE tokenizer with this vocab size",
        type=int,
        flag="--train-tokenizer",
        metavar="VOCAB_SIZE",
    )
    text_key: str = _option(_RECORD.text_key, "field holding the text (json/csv/parquet)")
    format: str = _option(
        _RECORD.kind,
        "records: plain text, or prompt→completion / chat with loss on completions only",
        choices=KINDS,
    )
    prompt_key: str = _option(_RECORD.prompt_key, "prompt field (prompt-completion)")
    completion_key: str = _option(_RECORD.completion_key, "completion field (prompt-completion)")
    messages_key: str = _option(_RECORD.messages_key, "[{role, content}] field (chat)")
    chat_template: str = _option(
        "auto",
        "render chats with the tokenizer's template (auto: when it has one) or built-in",
        choices=CHAT_TEMPLATES,
    )
    # A list, or (from the CLI) comma-separated tokens or a file with one per line.
    add_tokens: list[str] | str | None = _option(
        None,
        "domain tokens to add to the tokenizer: comma-separated, or a file, one per line",
        metavar="TOKENS|FILE",
    )
    val_fraction: float = _option(0.01, "fraction of documents held out for val", type=float)
    seed: int = _option(0, "seed of the train/val split and the tokenizer's sample", type=int)
    shard_tokens: int = _option(2**26, "tokens per shard", type=int)
    errors: str = _option("strict", "what to do with text that is not valid UTF-8", choices=ERRORS)

    @classmethod
    def of(cls, options: PrepareOptions | None = None, **changes: Any) -> PrepareOptions:
        """`options` (default: all defaults) with `changes`; TypeError names an unknown one."""
        return replace(options or cls(), **changes)

    def check(self) -> None:
        """DataError naming the flag of the first option that is not usable."""
        if self.format not in KINDS:
            raise DataError(f"{flag('format')} {self.format}: must be one of {', '.join(KINDS)}")
        if self.tokenizer is None and self.train_tokenizer_vocab is None:
            raise DataError(
                "give either --tokenizer PATH (an HF tokenizer dir) or "
                f"{flag('train_tokenizer_vocab')} VOCAB_SIZE"
            )
        if self.tokenizer is not None and self.train_tokenizer_vocab is not None:
            raise DataError(
                "give either --tokenizer PATH or "
                f"{flag('train_tokenizer_vocab')} VOCAB_SIZE, not both"
            )
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataError(f"{flag('val_fraction')} {self.val_fraction}: must be in [0, 1)")
        if self.shard_tokens < 1:
            raise DataError(f"{flag('shard_tokens')} {self.shard_tokens}: must be >= 1")
        for name, allowed in (("errors", ERRORS), ("chat_template", CHAT_TEMPLATES)):
            if getattr(self, name) not in allowed:
                raise DataError(
                    f"{flag(name)} {getattr(self, name)}: must be {' or '.join(allowed)}"
                )

    def record_format(self) -> RecordFormat:
        """How records become documents (the chat template is loaded by the pipeline)."""
        return RecordFormat(
            self.format, self.text_key, self.prompt_key, self.completion_key, self.messages_key
        )

    def stream_identity(self) -> dict[str, Any]:
        """The options that change the token streams (shard_tokens only cuts them)."""
        return {k: v for k, v in asdict(self).items() if k != "shard_tokens"}


def flag(name: str) -> str:
    """The command-line flag of option `name`."""
    meta = next(f.metadata for f in fields(PrepareOptions) if f.name == name)
    return meta["flag"] or "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per option, with its default, type, choices and help (for `gptrain prepare`)."""
    for f in fields(PrepareOptions):
        m = f.metadata
        shown = "" if f.default is None else " (default: %(default)s)"
        parser.add_argument(
            flag(f.name),
            dest=f.name,
            default=f.default,
            type=m["type"],
            choices=m["choices"],
            metavar=m["metavar"],
            help=m["help"] + shown,
        )


def from_arguments(args: argparse.Namespace) -> PrepareOptions:
    """The options parsed by the flags of `add_arguments`."""
    return PrepareOptions(**{f.name: getattr(args, f.name) for f in fields(PrepareOptions)})
