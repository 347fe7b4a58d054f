"""Normalize documents and judge their quality with the Gopher rules (Rae et al. 2021, app. A).

The one idea: every rule is a ratio that one C-level pass can count (str.split, str.count, a
regex, a Counter over zipped tokens), so a document costs O(len(text)) with no Python loop over
its characters; and CJK text, which has no spaces to split words on, gets the same rules with
characters in place of words. `quality_problem` names the first rule a document fails, so the
clean report can count removals per rule.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterator
from functools import lru_cache
from itertools import compress, count

from lmforge.config import CleanConfig

# --------------------------------------------------------------------------- normalize

_NEWLINE = re.compile("\r\n?|[\x0b\x0c\x85\u2028\u2029]")  # vertical tab and form feed too
_EMOJI = "\u2600-\u27bf\U0001f000-\U0001faff"
# Invisible characters that only break matching, dedup and tokenization: C0/C1 controls but \t
# and \n, soft hyphen, zero-width spaces and joiners, bidi overrides, word joiner, BOM, and lone
# surrogates (they cannot be encoded as UTF-8). ZWJ is kept between emoji, where it glues
# sequences such as a family into one glyph; elsewhere (and ZWNJ, which only Persian and Indic
# scripts need) it is noise in English and Chinese text.
_INVISIBLE = re.compile(
    "[\x00-\x08\x0e-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b\u200c\u200e\u200f\u202a-\u202e"
    "\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\ud800-\udfff]"
    f"|(?<![{_EMOJI}\ufe0f])\u200d|\u200d(?![{_EMOJI}])"
)
# horizontal white space other than " ": tab, no-break, en/em/thin..., ideographic (U+3000)
_ODD_SPACES = "\t\u00a0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u202f\u205f\u3000"
_SPACES = " " + _ODD_SPACES
# matches only where something changes (a run, or one odd space), so plain English costs nothing
_SPACE_RUN = re.compile(f"[{_SPACES}]{{2,}}|[{_ODD_SPACES}]")
_BLANK_LINES = re.compile(r"\n{3,}")


def _one_space(m: re.Match) -> str:
    # The ideographic space (U+3000) is a deliberate full-width gap in Chinese typesetting, e.g.
    # between a chapter number and its title; it stays full width, once. NFKC folds it to " ".
    return "\u3000" if "\u3000" in m.group() else " "


def _is_plain(text: str) -> bool:
    # Nothing for _NEWLINE, _INVISIBLE or _SPACE_RUN to change: every character they target is
    # a control, format, separator or non-ASCII space, which str.isprintable rejects at C speed
    # (3-10x faster than a regex scan), so most documents skip those scans.
    return "  " not in text and text.replace("\n", "").isprintable()


@lru_cache(maxsize=1)
def _ftfy_fixer():
    try:
        import ftfy
    except ImportError:
        raise ImportError("clean.fix_unicode needs ftfy: pip install lmforge[data]") from None
    # ftfy's width folding would turn Chinese full-width punctuation (，！？) into ASCII and its
    # quote uncurling would flatten “”: unicode_form=NFKC is the one switch for such folding.
    # Line breaks and control characters are ours, so that fix_unicode=false gets them too.
    config = ftfy.TextFixerConfig(
        normalization=None,
        fix_character_width=False,
        uncurl_quotes=False,
        fix_line_breaks=False,
        remove_control_chars=False,
        explain=False,
    )
    return lambda line: ftfy.fix_text(line, config)


def _fix_mojibake(text: str) -> str:
    fix = _ftfy_fixer()
    lines = text.split("\n")
    for i, line in enumerate(lines):
        # ASCII cannot be mojibake: ftfy could only unescape HTML or drop terminal escapes there,
        # and skipping such lines almost doubles the speed on English text
        if not line.isascii() or "&" in line or "\x1b" in line:
            lines[i] = fix(line)
    return "\n".join(lines)


@lru_cache(maxsize=16)
def compile_boilerplate(patterns: tuple[str, ...]) -> tuple[re.Pattern, ...]:
    """The `clean.boilerplate` regexes, compiled once per configuration (key: the patterns).

    MULTILINE, so that one search of the whole document finds every line a pattern matches on
    its own (^ and $ are then line edges): only a document that hits is checked line by line."""
    return tuple(re.compile(p, re.M) for p in patterns)


def normalize_text(text: str, cfg: CleanConfig) -> str:
    """Repair, normalize and tidy one document; "" when nothing is left of it.

    Steps: newlines to \\n; ftfy mojibake repair (cfg.fix_unicode); cfg.unicode_form; drop
    invisible characters; collapse runs of spaces and tabs to one space and strip each line;
    drop lines that match a cfg.boilerplate regex; at most one blank line in a row."""
    if not _is_plain(text):
        text = _NEWLINE.sub("\n", text)
    if cfg.fix_unicode:
        text = _fix_mojibake(text)
    if cfg.unicode_form != "none":
        text = unicodedata.normalize(cfg.unicode_form, text)
    if not _is_plain(text):
        text = _INVISIBLE.sub("", text)
        text = _SPACE_RUN.sub(_one_space, text)
    lines = [line.strip(_SPACES) for line in text.split("\n")]
    hits = [p for p in compile_boilerplate(tuple(cfg.boilerplate)) if p.search(text)]
    if hits:
        lines = [line for line in lines if not any(p.search(line) for p in hits)]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


# --------------------------------------------------------------------------- CJK

CJK_LANGS = ("zh", "ja", "ko")
CJK_SHARE = 0.3  # above this share of CJK characters, text gets the character-based rules
# Han (with extensions and compatibility forms), kana and hangul
_CJK = (
    "\u1100-\u11ff\u3040-\u30ff\u3130-\u318f\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af"
    "\uf900-\ufaff\U00020000-\U0003134f"
)
_CJK_RUN = re.compile(f"[{_CJK}]+")
# n-gram units of CJK text: each CJK character, and each run of other letters and digits (so
# the English inside a Chinese document still counts in words); punctuation and spaces drop out
_CJK_TOKEN = re.compile(f"[{_CJK}]|[^\\W{_CJK}]+")


def is_cjk_text(text: str, threshold: float = CJK_SHARE) -> bool:
    """Whether more than `threshold` of the non-space characters are CJK ideographs, kana or
    hangul: such text gets the character-based rules, since it has no spaces between words."""
    return _cjk_share(text, sum(map(len, text.split()))) > threshold


def _cjk_share(text: str, n_chars: int) -> float:
    if text.isascii() or not n_chars:
        return 0.0
    return sum(map(len, _CJK_RUN.findall(text))) / n_chars


# --------------------------------------------------------------------------- quality rules

# Gopher's stop words: real prose has at least two of them, lists and tables of names do not.
STOP_WORDS_EN = frozenset(("the", "be", "to", "of", "and", "that", "have", "with"))
# Function words of modern and classical Chinese (simplified and traditional), with a few
# Japanese and Korean particles so that ja/ko text is not failed by a list made for Chinese.
STOP_WORDS_CJK = frozenset(
    "的了是在和也有不我你他她这這那们們个個着著就都与與但把被从從对對为為到说說没沒很还還又吗嗎呢吧"
    "之其而以曰者乃矣焉哉乎兮耶欤歟夫盖蓋则則亦皆所吾汝尔爾若遂故且此彼何莫弗勿已既未将將即於于"
    "のにはをがでとも"
    "은는이가을를에의도"
)
_BULLETS = tuple("-*•‣◦⁃∙·●○■□▪▫◆◇➢►▶")  # a line starting with one is a bullet point
_DIGITS = "0123456789０１２３４５６７８９"
# a whitespace token without a letter: only digits, underscores and punctuation
_NO_LETTER_WORD = re.compile(r"(?<!\S)(?:[^\w\s]|[\d_])+(?!\S)")


def quality_problem(text: str, cfg: CleanConfig, lang: str | None = None) -> str | None:
    """The name of the first quality rule `text` fails, or None when it passes them all.

    Words are whitespace tokens, as in Gopher. CJK text (is_cjk_text, or lang zh/ja/ko) counts
    non-space characters instead, skips the word-length and alphabetic-word rules, and takes
    its n-grams over characters. Cheap counts come first, the repetition rules last."""
    low = text.lower()
    words = low.split()
    n_chars = max(sum(map(len, words)), 1)  # non-space characters
    cjk = lang in CJK_LANGS or _cjk_share(text, n_chars) > CJK_SHARE
    if cjk:
        size = n_chars
        if size < cfg.min_chars:
            return "too_few_chars"
        if size > cfg.max_words:
            return "too_many_chars"
    else:
        size = max(len(words), 1)
        if len(words) < cfg.min_words:
            return "too_few_words"
        if size > cfg.max_words:
            return "too_many_words"
        if not cfg.min_mean_word_len <= n_chars / size <= cfg.max_mean_word_len:
            return "mean_word_length"
    # "……", the Chinese ellipsis, is one ellipsis
    ellipses = text.count("...") + text.count("…") - text.count("……")
    if (text.count("#") + ellipses) / size > cfg.max_symbol_ratio:
        return "symbol_ratio"
    if sum(map(text.count, _DIGITS)) / n_chars > cfg.max_digit_ratio:
        return "digit_ratio"
    lines = [line for line in map(str.strip, text.split("\n")) if line]
    n_lines = max(len(lines), 1)
    if sum(line.startswith(_BULLETS) for line in lines) / n_lines > cfg.max_bullet_lines:
        return "bullet_lines"
    if sum(line.endswith(("...", "…")) for line in lines) / n_lines > cfg.max_ellipsis_lines:
        return "ellipsis_lines"
    if not cjk and 1 - len(_NO_LETTER_WORD.findall(text)) / size < cfg.min_alpha_words:
        return "alpha_words"
    tokens = _CJK_TOKEN.findall(low) if cjk else words
    counts = Counter(tokens)
    stop_words = STOP_WORDS_CJK if cjk else STOP_WORDS_EN
    if len(stop_words.intersection(counts)) < cfg.min_stop_words:
        return "stop_words"
    return _line_problem(lines, cfg) or _ngram_problem(tokens, counts, cfg)


def _line_problem(lines: list[str], cfg: CleanConfig) -> str | None:
    if not lines:
        return None
    distinct = set(lines)
    if (len(lines) - len(distinct)) / len(lines) > cfg.max_dup_lines:  # repeats, not firsts
        return "dup_lines"
    total = sum(map(len, lines))
    if (total - sum(map(len, distinct))) / total > cfg.max_dup_line_chars:
        return "dup_line_chars"
    return None


def _ngrams(tokens: list[str], n: int) -> Iterator[tuple[str, ...]]:
    return zip(*(tokens[i:] for i in range(n)))


def _ngram_problem(tokens: list[str], counts: Counter, cfg: CleanConfig) -> str | None:
    """Gopher's repetition rules over word (CJK: character) n-grams, in characters of tokens."""
    lens = list(map(len, tokens))
    total = sum(lens)
    if not total:
        return None
    # An n-gram occurs at most as often as each of its tokens, so its characters are bounded by
    # n times the heaviest token's (count x length): most documents skip the 2- and 3-gram Counters.
    heaviest = max(map(int.__mul__, counts.values(), map(len, counts)))
    for n, limit in zip((2, 3, 4), cfg.max_top_ngram):
        if n * heaviest <= limit * total:
            continue
        grams = Counter(_ngrams(tokens, n))
        if grams:
            gram, c = grams.most_common(1)[0]
            # c > 1: an n-gram seen once is not repetition, however short the document
            if c > 1 and c * sum(map(len, gram)) > limit * total:
                return f"top_{n}gram"
    # Characters covered by repeated n-grams only shrink as n grows (a repeated 6-gram is made of
    # two repeated 5-grams), so once the share is under every remaining limit the larger n can pass.
    limits = list(cfg.max_dup_ngram)
    for i, n in enumerate(range(5, 5 + len(limits))):
        share = _dup_ngram_chars(tokens, lens, n) / total
        if share > limits[i]:
            return f"dup_{n}gram"
        if share <= min(limits[i:]):
            return None
    return None


def _dup_ngram_chars(tokens: list[str], lens: list[int], n: int) -> int:
    """Characters of the tokens covered by an n-gram that already occurred earlier in the text
    (as dup_lines counts repeats, not first occurrences), each token counted once."""
    # One pass in C, no list of n-grams: setdefault hands back each n-gram's first position,
    # and a repeat is a position that differs from it.
    first: dict[tuple[str, ...], int] = {}
    firsts = map(first.setdefault, _ngrams(tokens, n), count())
    starts = compress(count(), map(int.__ne__, firsts, count()))
    covered = bytearray(len(tokens))  # 1 = inside a repeat; overlapping repeats count once
    ones = b"\x01" * n
    for i in starts:
        covered[i : i + n] = ones
    return sum(compress(lens, covered))
