"""SentencePiece tokenizer and where to find it.

Resolution order (`find_tokenizer`): an explicit path (`--tokenizer`), else `tokenizer.model`
beside the checkpoint (in its directory or the parent), else the URL in $TOKENIZER_URL,
downloaded once into the user cache (fetch.cached_download, checked against $TOKENIZER_SHA256
when set) and reused offline. Prompts are encoded without a BOS (SPEC §1).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from .errors import SlncxError

TOKENIZER_FILE = "tokenizer.model"


class TokenizerError(SlncxError):
    """No tokenizer could be found or loaded."""


class Tokenizer:
    def __init__(self, path):
        import sentencepiece as spm

        self.path = Path(path)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{self.path}: not a SentencePiece model ({e})") from None

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    def encode(self, text: str) -> list:
        return list(self.sp.encode(text))

    def decode(self, ids) -> str:
        """Text of ids, leaving out pad and eos."""
        return self.sp.decode([int(i) for i in ids if int(i) not in (self.pad_id, self.eos_id)])


def find_tokenizer(checkpoint=None, explicit=None) -> Path:
    """The tokenizer file to use (see the module docstring), or TokenizerError saying what to do."""
    if explicit:
        p = Path(explicit)
        if not p.is_file():
            raise TokenizerError(f"--tokenizer {p}: no such file")
        return p
    if checkpoint is not None:
        ck = Path(checkpoint)
        for candidate in (ck / TOKENIZER_FILE, ck.parent / TOKENIZER_FILE, ck / "ckpt-0" / TOKENIZER_FILE):
            if candidate.is_file():
                return candidate
    url = os.environ.get("TOKENIZER_URL")
    if url:
        try:
            from .fetch import cached_download  # noqa: PLC0415 (network code only when needed)
        except ImportError:
            raise TokenizerError("TOKENIZER_URL is set but this build cannot download (slncx_tools.fetch.cached_download missing)") from None

        return Path(cached_download(url, sha256=os.environ.get("TOKENIZER_SHA256") or None))
    raise TokenizerError(
        f"no tokenizer found: pass --tokenizer PATH, put {TOKENIZER_FILE} beside the checkpoint, "
        "or set TOKENIZER_URL to download it (or feed ids with --tokens 1,2,3)"
    )


def load_tokenizer(checkpoint=None, explicit=None, vocab_size: Optional[int] = None) -> Tokenizer:
    tok = Tokenizer(find_tokenizer(checkpoint, explicit))
    if vocab_size is not None and tok.vocab_size > vocab_size:
        raise TokenizerError(
            f"tokenizer {tok.path} has {tok.vocab_size} tokens but the checkpoint's vocabulary is "
            f"{vocab_size}: they do not belong together (use --tokens for models without one)"
        )
    return tok
