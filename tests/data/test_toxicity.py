"""Toxicity: the word-list score on clean and abusive English and Chinese, its density formula,
the bundled lists themselves, and the classifier registry."""

import re

import pytest

from lmforge.config import CleanConfig
from lmforge.data import toxicity
from lmforge.data.toxicity import (
    WORDLISTS,
    get_classifier,
    read_wordlist,
    register_classifier,
    toxicity_problem,
    wordlist_score,
)

CFG = CleanConfig()

ARTICLE_EN = (
    "The river town grew slowly around a stone bridge that merchants had built in the twelfth "
    "century. Farmers carried grain to the market each week, and the tolls paid for a small "
    "school, a chapel with painted windows, and a granary beside the water. Travelers wrote that "
    "the streets were narrow but clean, lit at night by oil lamps hanging from iron brackets. "
    "When the railway arrived, the old market lost much of its trade. Some families moved to the "
    "coast to work in shipyards, while others opened workshops making furniture, clocks and "
    "musical instruments for buyers in distant cities."
)
ARTICLE_ZH = (
    "江南的小镇在清晨醒来，河面上飘着一层薄雾。老人们坐在桥头喝茶，谈论着今年的收成和远方的亲戚。"
    "孩子们背着书包跑过石板路，笑声一直传到对岸的柳树下。镇上有一家百年老店，专门制作手工竹器，"
    "师傅说这门手艺是祖父传下来的，如今年轻人大多去了城里，愿意学的人越来越少。"
)
ABUSE_EN = "You are a worthless piece of shit, you fucking loser. Nobody wants you here."
ABUSE_ZH = "你这个傻逼，滚你妈的，王八蛋！"


def test_clean_texts_score_zero():
    for text in (ARTICLE_EN, ARTICLE_ZH, "Scunthorpe is a town.", "体操运动员", "doo-wop", ""):
        assert wordlist_score(text) == 0.0, text
        assert toxicity_problem(text, CFG) is None


def test_abusive_texts_score_high():
    for text in (ABUSE_EN, ABUSE_ZH, ABUSE_EN.upper(), "傻逼 idiot", "kill   yourself"):
        assert wordlist_score(text) >= 0.5, text
        assert toxicity_problem(text, CFG) == "toxic"


def test_score_is_a_density():
    # one hit per 20 words or fewer scores 1; then 1 / (words x 0.04)
    assert wordlist_score("shit") == 1.0
    words = ARTICLE_EN.split()  # 100 words
    one_hit = " ".join(words[:49] + ["fuck"])  # 50 words, one hit
    assert wordlist_score(one_hit) == pytest.approx(0.5)
    # the same word once in a long article stays far below the cut
    long_doc = ARTICLE_EN + " Their first album was called Holy Shit. " + ARTICLE_EN
    n_words = len(re.findall("[a-z]+", long_doc.lower()))  # 207
    assert wordlist_score(long_doc) == pytest.approx(1 / (n_words * 0.04))
    assert wordlist_score(long_doc) < 0.15
    assert toxicity_problem(long_doc, CFG) is None
    # Chinese length: characters / 1.5; 150 Han characters = 100 words
    zh = "我" * 148 + "傻逼"
    assert wordlist_score(zh) == pytest.approx(1 / (100 * 0.04))


def test_matching_rules():
    assert wordlist_score("assholes") == wordlist_score("Asshole") == 1.0  # plural, any case
    assert wordlist_score("cocktail shittake grasshopper") == 0.0  # whole words only
    # the longest Chinese term wins: 去你妈的 is one hit, not also 你妈的
    base = "我" * 300  # 200 words
    assert wordlist_score(base + "去你妈的") == pytest.approx(1 / (202.67 * 0.04), rel=1e-3)


def test_threshold_comes_from_config():
    text = " ".join(ARTICLE_EN.split()[:49] + ["fuck"])  # scores 0.5
    assert toxicity_problem(text, CleanConfig(max_toxicity=0.5)) == "toxic"
    assert toxicity_problem(text, CleanConfig(max_toxicity=0.6)) is None


def test_wordlists_are_well_formed():
    for name in ("toxic_en.txt", "toxic_zh.txt"):
        path = WORDLISTS / name
        assert path.read_text(encoding="utf-8").startswith(f"# {name}:")  # the header
        terms = read_wordlist(path)
        assert 50 <= len(terms) <= 150
        assert len(set(terms)) == len(terms), "duplicate terms"
    assert all(t.isascii() and t == t.lower() for t in read_wordlist(WORDLISTS / "toxic_en.txt"))


def test_unknown_classifier_lists_the_registered_ones():
    with pytest.raises(ValueError, match="unknown toxicity classifier 'nope'.*wordlist"):
        get_classifier("nope")
    with pytest.raises(ValueError, match="nope"):
        toxicity_problem("hello", CleanConfig(toxicity_classifier="nope"))


def test_custom_classifier_is_used(monkeypatch):
    monkeypatch.setattr(toxicity, "_CLASSIFIERS", dict(toxicity._CLASSIFIERS))  # undone after
    seen = []

    def by_length(text, lang):
        seen.append(lang)
        return min(1.0, len(text) / 100)

    register_classifier("by_length", by_length)
    assert get_classifier("by_length") is by_length
    cfg = CleanConfig(toxicity_classifier="by_length")
    assert toxicity_problem("x" * 60, cfg, lang="en") == "toxic"
    assert toxicity_problem(ABUSE_EN[:10], cfg, lang="zh") is None
    assert seen == ["en", "zh"]

    register_classifier("broken", lambda text, lang: 2.0)
    with pytest.raises(ValueError, match="'broken' returned 2.0"):
        toxicity_problem("hello", CleanConfig(toxicity_classifier="broken"))
    with pytest.raises(TypeError):
        register_classifier("not_a_function", 0.5)
