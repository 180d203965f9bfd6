"""The ΔCLIP text tokenizer: big_vision's BERT WordPiece tokenization, rebuilt on ``tokenizers``.

The paper's released ΔCLIPs were trained in JAX with tensorflow_text's ``BertTokenizer(vocab,
lower_case=True)`` over BERT-base-uncased's vocabulary with ``[unused0]``/``[unused1]`` renamed
``[bos]``/``[eos]`` (``vocab/bert_base_vocab_bos_eos.txt``). A text becomes ``[bos] pieces [eos]``,
padded with 0 or truncated to ``context_length - 1``; when the batch's *first* text fills that
length, the last slot of *every* row is set to ``[eos]`` (the authors' code decides on row 0 only);
then ``[CLS]`` is appended as the last token.

tensorflow_text's basic tokenizer, reproduced here without TensorFlow: full Unicode case folding
(ICU's, = ``str.casefold``), NFD, combining marks (``Mn``) removed, control and format characters
(``Cc``, ``Cf``) made spaces, split on ASCII whitespace (RE2's ``\\s``), ASCII symbols, ``\\p{P}``
punctuation and CJK ideographs kept as one-character tokens; then WordPiece (``##`` suffixes, a word
over 100 *bytes* or without a full split is ``[UNK]``). Unlike ``BertTokenizerFast`` it keeps
non-ASCII spaces (NBSP) inside words and folds ``ß`` to ``ss``, as tensorflow_text does.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import torch
from tokenizers import Regex, normalizers, pre_tokenizers
from tokenizers.models import WordPiece

from dvd.config import ConfigError

VOCAB_NAME = "bert_base_vocab_bos_eos.txt"
MAX_BYTES_PER_WORD = 100  # tensorflow_text's WordpieceTokenizer default
_CJK = (
    r"\x{4E00}-\x{9FFF}\x{3400}-\x{4DBF}\x{20000}-\x{2A6DF}\x{2A700}-\x{2B73F}\x{2B740}-\x{2B81F}"
    r"\x{2B820}-\x{2CEAF}\x{F900}-\x{FAFF}\x{2F800}-\x{2FA1F}"
)
_KEPT_DELIMITERS = r"[!-/:-@\[-`{-~]|\p{P}|[" + _CJK + "]"


def packaged_vocab() -> Path:
    """The vocabulary shipped with dvd (BERT-base-uncased, Apache-2.0; see ``vocab/README.md``)."""
    return Path(str(resources.files("dvd.models") / "vocab" / VOCAB_NAME))


class DeltaTokenizer:
    """Texts -> (N, context_length) LongTensor of ΔCLIP token ids, exactly as the authors' code makes them."""

    def __init__(self, vocab_path: str | Path | None = None, *, context_length: int = 64) -> None:
        self.vocab_path = Path(vocab_path) if vocab_path is not None else packaged_vocab()
        if not self.vocab_path.is_file():
            raise FileNotFoundError(f"ΔCLIP vocabulary {self.vocab_path} does not exist")
        if context_length < 3:
            raise ConfigError(f"ΔCLIP context_length must be >= 3 ([bos] [eos] [CLS]), got {context_length}")
        self.context_length = int(context_length)
        vocab = self.vocab_path.read_text(encoding="utf-8").split("\n")
        ids = {token: index for index, token in enumerate(vocab)}
        missing = [t for t in ("[bos]", "[eos]", "[CLS]", "[UNK]") if t not in ids]
        if missing:
            raise ConfigError(f"{self.vocab_path} lacks {', '.join(missing)}; it is not the ΔCLIP vocabulary")
        self.bos_id, self.eos_id, self.cls_id = ids["[bos]"], ids["[eos]"], ids["[CLS]"]
        self.unk_id = ids["[UNK]"]
        pieces = {token: index for token, index in ids.items() if token}
        self._wordpiece = WordPiece(pieces, unk_token="[UNK]", max_input_chars_per_word=MAX_BYTES_PER_WORD)
        self._normalize = normalizers.Sequence(
            [
                normalizers.NFD(),
                normalizers.Replace(Regex(r"\p{Mn}"), ""),  # not StripAccents: that drops Mc/Me too
                normalizers.Replace(Regex(r"\p{Cc}|\p{Cf}"), " "),  # control and format characters
            ]
        )
        self._split = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(r"[\t\n\f\r ]+"), behavior="removed"),
                pre_tokenizers.Split(Regex(_KEPT_DELIMITERS), behavior="isolated"),
            ]
        )

    def words(self, text: str) -> list[str]:
        """The basic tokenizer's words: case-folded, accents stripped, split at spaces/punctuation/CJK."""
        normalized = self._normalize.normalize_str(text.casefold())
        return [word for word, _ in self._split.pre_tokenize_str(normalized)]

    def encode(self, text: str) -> list[int]:
        """WordPiece ids of one text, no special tokens."""
        ids: list[int] = []
        for word in self.words(text):
            if len(word.encode("utf-8")) > MAX_BYTES_PER_WORD:
                ids.append(self.unk_id)
            else:
                ids += [token.id for token in self._wordpiece.tokenize(word)]
        return ids

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        width = (context_length or self.context_length) - 1
        rows = [[self.bos_id, *self.encode(t), self.eos_id][:width] for t in texts]
        result = torch.zeros(len(rows), width + 1, dtype=torch.long)
        for index, row in enumerate(rows):
            result[index, : len(row)] = torch.tensor(row, dtype=torch.long)
        if rows and len(rows[0]) == width:  # the authors' tf.cond looks at row 0's mask only
            result[:, width - 1] = self.eos_id
        result[:, width] = self.cls_id
        return result

    def save_pretrained(self, directory: str | Path) -> Path:
        """Copy the vocabulary next to a saved checkpoint (``text_cfg.vocab_path`` names it)."""
        target = Path(directory) / VOCAB_NAME
        if self.vocab_path.resolve() != target.resolve():
            shutil.copyfile(self.vocab_path, target)
        return target
