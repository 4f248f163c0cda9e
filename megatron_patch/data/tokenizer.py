"""A SentencePiece tokenizer for megatron.core's GPT datasets.

Special ids of the models written by ``tools/train_tokenizer.py``:

====  ==========  ===============================================================
 id   piece       use
====  ==========  ===============================================================
 0    ``<unk>``   unknown (rare: byte fallback covers every UTF-8 byte)
 1    ``<s>``     beginning of sequence (not added by ``tokenize``)
 2    ``</s>``    end of document: :attr:`SentencePieceTokenizer.eod`, appended by
                  ``tools/preprocess_data.py --append-eod``
 3    ``<pad>``   padding: :attr:`SentencePieceTokenizer.pad`, never produced by
                  ``tokenize``
====  ==========  ===============================================================

Any other SentencePiece model works too, as long as it defines an eos piece (used as EOD).
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict

import sentencepiece
from megatron.core.tokenizers import MegatronTokenizerBase

from megatron_patch.errors import DataError


class SentencePieceTokenizer(MegatronTokenizerBase):
    """Tokenizer over a SentencePiece ``.model`` file, usable as ``GPTDatasetConfig.tokenizer``.

    Args:
        model_path: path to the ``.model`` file.

    Raises:
        DataError: the file is missing or unreadable, is not a SentencePiece model, or has no
            eos piece (one-line message naming the path and the fix; a ``ValueError`` too).
    """

    def __init__(self, model_path: str) -> None:
        super().__init__(path=str(model_path), config={})
        model_path = str(model_path)
        try:
            with open(model_path, "rb") as stream:
                proto = stream.read()
        except OSError as err:
            raise DataError(
                f"cannot read tokenizer model '{model_path}': {err.strerror}; pass the .model "
                f"file written by tools/train_tokenizer.py (--tokenizer-model)"
            ) from None
        self._load(model_path, proto)

    def _load(self, model_path: str, proto: bytes) -> None:
        processor = sentencepiece.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(proto)
        except Exception:  # sentencepiece raises RuntimeError or OSError, depending on version
            raise DataError(
                f"tokenizer model '{model_path}' is not a SentencePiece model; pass the .model "
                f"file written by tools/train_tokenizer.py (--tokenizer-model)"
            ) from None
        if processor.eos_id() < 0:
            raise DataError(
                f"tokenizer model '{model_path}' has no eos piece to use as end of document; "
                f"train one with tools/train_tokenizer.py (it defines </s> as id 2)"
            )
        self._processor = processor
        self._proto = proto
        self._vocab: dict[str, int] | None = None
        self.model_path = model_path
        self.sha256 = hashlib.sha256(proto).hexdigest()
        # read by megatron's dataset cache (MegatronDataset.unique_description): a changed model
        # file gives a different hash, hence new index files. The path is left out on purpose, so
        # that a moved tokenizer still hits the cache.
        self.unique_identifiers = OrderedDict(
            [
                ("class", f"{type(self).__module__}.{type(self).__qualname__}"),
                ("sha256", self.sha256),
                ("vocab_size", self.vocab_size),
                ("eod", self.eod),
            ]
        )

    def __getstate__(self) -> dict:
        """Pickle the model bytes (DataLoader workers may be spawned), not the C++ processor."""
        return {"model_path": self.model_path, "proto": self._proto}

    def __setstate__(self, state: dict) -> None:
        self.path = state["model_path"]
        self._load(state["model_path"], state["proto"])

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` (no bos, no eod)."""
        return self._processor.encode(text, out_type=int)

    def detokenize(self, ids: list[int]) -> str:
        """Text of token ids (special ids decode to nothing)."""
        return self._processor.decode([int(i) for i in ids])

    def apply_chat_template(self, *args, **kwargs):
        """Base-model pre-training tokenizer: there is no chat template."""
        raise NotImplementedError("SentencePieceTokenizer is a pre-training tokenizer and has no chat template")

    def piece(self, token_id: int) -> str:
        """The piece (string) of one id, e.g. ``piece(tok.eod) == "</s>"``."""
        return self._processor.id_to_piece(int(token_id))

    @property
    def vocab(self) -> dict[str, int]:
        """``{piece: id}`` for all ``vocab_size`` pieces."""
        if self._vocab is None:
            self._vocab = {self._processor.id_to_piece(i): i for i in range(self._processor.get_piece_size())}
        return self._vocab

    @property
    def vocab_sha256(self) -> str:
        """sha256 of the pieces in id order: what ids mean, unlike :attr:`sha256` of the file, which
        also covers the training settings (a tokenizer trained again identically has the same)."""
        pieces = (self._processor.id_to_piece(i) for i in range(self.vocab_size))
        return hashlib.sha256("\n".join(pieces).encode("utf-8")).hexdigest()

    @property
    def inv_vocab(self) -> dict[int, str]:
        """``{id: piece}``."""
        return {i: piece for piece, i in self.vocab.items()}

    @property
    def vocab_size(self) -> int:
        """Number of pieces (ids are ``0 .. vocab_size - 1``)."""
        return self._processor.get_piece_size()

    @property
    def eod(self) -> int:
        """End-of-document id: the model's eos piece (``</s>``, id 2 for our models)."""
        return self._processor.eos_id()

    @property
    def eos(self) -> int:
        """Same as :attr:`eod`."""
        return self.eod

    @property
    def bos(self) -> int:
        """Beginning-of-sequence id (``<s>``), or -1 when the model has none."""
        return self._processor.bos_id()

    @property
    def unk(self) -> int:
        """Unknown-piece id (``<unk>``)."""
        return self._processor.unk_id()

    @property
    def pad(self) -> int:
        """Padding id (``<pad>``), or -1 when the model has none (megatron's own default)."""
        return self._processor.pad_id()

    def __repr__(self) -> str:
        name = os.path.basename(self.model_path)
        return f"{type(self).__name__}({name!r}, vocab_size={self.vocab_size}, eod={self.eod})"
