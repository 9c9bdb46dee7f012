"""The token estimate is never far below what BPE tokenizers count (issue 14, item 3).

tests/test_exact_tokens.py compares it with OpenAI's encodings themselves.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from server.token_estimate import count_pieces, count_text, split_pieces


def test_long_unbroken_text_is_not_a_handful_of_tokens() -> None:
    # One "word" to the word count; BPE tokenizers give it tens of thousands.
    assert count_pieces("x" * 200_000) == 1
    assert count_text("x" * 200_000) >= 200_000 // 4
    assert count_text("aGVsbG8gd29ybGQ" * 1_000) >= 15_000 // 4  # base64-like


def test_random_runs_count_a_token_a_character() -> None:
    # BPE gives hex, base64, UUIDs and keys a token every 1.5 to 2 characters
    # (o200k_base: 40,000 characters of base64 were 27,322 tokens); the
    # length bound alone said one per 4. Exact counts (o200k_base, cl100k_base)
    # in the comments.
    hex_digest = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    assert count_text(hex_digest) == len(hex_digest)  # 43, 43
    blob = "QmFzZTY0IGVuY29kZWQgYmxvYg+/AAAAAAAAAAAAAA=="
    assert count_text(blob) == len(blob)  # 24, 25
    assert count_text("123e4567-e89b-12d3-a456-426614174000") >= 18  # 18, 18
    # A long word is not a blob.
    assert count_text("internationalization") == 5  # 2, 2


def test_numbers_count_a_token_per_three_digits() -> None:
    # As both encodings split them: 8444218515250481 is six tokens.
    assert count_text("8444218515250481") == 6
    assert count_text("0.8444218515250481") == 8


def test_each_kind_of_text_counts_on_its_own() -> None:
    # Words and punctuation by their pieces, a blob by its length: the sum.
    prose = "the, the, the, the, the, "
    blob = "AA0AAAAAAAE0AABFAA0AAAAAAAE0AABF"
    assert count_text(f"{prose}{blob}") >= count_text(prose) + len(blob)


def test_cjk_counts_about_a_token_a_character() -> None:
    japanese = "日本語の文章です。" * 500  # 4,500 characters
    assert count_pieces(japanese) <= 1_000
    assert count_text(japanese) >= 4_500
    assert count_text("한국어 문장입니다" * 100) >= 800


def test_other_scripts_count_by_their_utf8_length() -> None:
    russian = "Привет, как дела? " * 100  # 1,800 characters, 3,200 bytes
    assert count_text(russian) >= len(russian.encode()) // 4


def test_english_prose_stays_close_to_the_word_count() -> None:
    prose = "The quick brown fox jumps over the lazy dog, and then it rests. " * 50
    words = count_pieces(prose)
    assert words <= count_text(prose) <= words * 1.4


@given(st.text(max_size=300))
def test_the_estimate_bounds(text: str) -> None:
    estimate = count_text(text)
    # Never below the word count; never above one token per character (the
    # context-window check's cheap bound relies on it).
    assert count_pieces(text) <= estimate <= len(text)
    assert "".join(split_pieces(text)) == text
