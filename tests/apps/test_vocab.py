"""The apps' one character vocabulary: ids, padding, specials and named errors."""

import pytest
import torch

from attnkit.apps._vocab import CharVocab

TEXT = "attention is all you need; the cat sat on the mat. "


def test_plain_vocabulary_ids_are_indices_into_chars():
    vocab = CharVocab.from_text(TEXT)
    assert vocab.chars == sorted(set(TEXT))
    assert vocab.encode("a") == [vocab.chars.index("a")]
    assert len(vocab) == vocab.vocab_size == len(set(TEXT))
    assert vocab.decode(vocab.encode("the mat")) == "the mat"
    assert vocab.decode(torch.tensor(vocab.encode("cat"))) == "cat"


def test_padding_and_specials_come_first_and_decode_skips_them():
    vocab = CharVocab("ab", specials=("<bos>",), padding=True)
    assert vocab.special("<bos>") == 1
    assert vocab.encode("ba") == [3, 2]
    assert vocab.decode([0, 1, 2, 3, 0]) == "ab"
    batch = vocab.batch(["ab", "b"])
    assert torch.equal(batch, torch.tensor([[2, 3], [3, 0]]))


def test_errors_name_the_problem():
    vocab = CharVocab("ab")
    with pytest.raises(ValueError, match=r"2 character\(s\) not in the vocabulary: 'c', '!'"):
        vocab.encode("acb!c")
    with pytest.raises(ValueError, match="repeats characters"):
        CharVocab("aa")
    with pytest.raises(ValueError, match="at least one character"):
        CharVocab("")
    with pytest.raises(ValueError, match="padding=True"):
        vocab.batch(["a"])
    with pytest.raises(ValueError, match="unknown special token '<eos>'"):
        vocab.special("<eos>")
