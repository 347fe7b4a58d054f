"""PII scrubbing for the `pii` clean step: find e-mails, phones, IPs, card numbers and national IDs,
and replace each with a typed placeholder such as <EMAIL>.

The one idea: a regex only proposes a candidate; a small pure validator (Luhn, the ISO 7064 check
character of a Chinese resident ID, the `ipaddress` parser, the SSN and phone numbering rules)
decides. Candidates of all types are then resolved by precedence: e-mail first, then the validated
IDs and cards, then IPs, then phones, the longest candidate winning within a type.

Boundaries are ASCII lookarounds, never `\\b`: Python counts CJK characters as word characters,
so `\\b` finds no edge in 请发邮件到zhang.san@example.com联系. Every pattern is compiled with
re.ASCII so `\\d` means 0-9 and full-width digits are left alone.
"""

from __future__ import annotations

import bisect
import datetime
import ipaddress
import json
import re
from pathlib import Path

from lmforge.config import PII_TYPES

PLACEHOLDERS = {
    "email": "<EMAIL>",
    "phone": "<PHONE>",
    "ip": "<IP>",
    "credit_card": "<CREDIT_CARD>",
    "national_id": "<ID>",
}
# overlapping candidates: the lower rank wins. An e-mail's local part may be a phone or QQ number,
# and the checksummed types are stronger evidence than a phone pattern that fits many numbers.
RANK = {"email": 0, "national_id": 1, "credit_card": 2, "ip": 3, "phone": 4}

# A number starts where no letter or digit touches it, and not right after a digit and one of
# . - : / (which would make it the tail of a decimal, version, date, time or serial); it ends
# the same way mirrored. Stricter than \b, which would also let 2023-13800138000 through.
_NUM_START = r"(?<![0-9A-Za-z])(?<![0-9][.\-:/])"
_NUM_END = r"(?![0-9A-Za-z])(?![.\-:/][0-9A-Za-z])"


def _compile(pattern: str) -> re.Pattern:
    return re.compile(pattern, re.ASCII)


EMAIL_RE = _compile(
    r"(?<![A-Za-z0-9._%+\-])"
    r"[A-Za-z0-9_%+\-]+(?:\.[A-Za-z0-9_%+\-]+)*"  # local part: no leading, trailing or double dot
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}"
    r"(?![A-Za-z0-9\-])"
)
IPV4_RE = _compile(
    r"(?<![0-9A-Za-z.])"
    r"(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
    r"(?![0-9A-Za-z])(?!\.\d)"  # 1.2.3.4.5 is a version, not an address followed by ".5"
)
# loose on purpose: the ipaddress module does the real parsing
IPV6_RE = _compile(
    r"(?<![0-9A-Za-z:.])"
    r"(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|\d{1,3}(?:\.\d{1,3}){3})"
    r"(?![0-9A-Za-z:])(?!\.\d)"
)
CARD_RES = [
    _compile(_NUM_START + r"\d{13,19}" + _NUM_END),
    _compile(_NUM_START + r"\d{4}([ \-])\d{4}\1\d{4}\1\d{4}(?:\1\d{3})?" + _NUM_END),  # 4-4-4-4(-3)
    _compile(_NUM_START + r"\d{4}([ \-])\d{6}\1\d{4,5}" + _NUM_END),  # Amex 4-6-5, Diners 4-6-4
]
CN_ID_RE = _compile(r"(?<![0-9A-Za-z])\d{17}[\dXx](?![0-9A-Za-z])")
SSN_RE = _compile(r"(?<![0-9A-Za-z\-])\d{3}-\d{2}-\d{4}(?![0-9A-Za-z])(?!-\d)")

FILE_EXTENSIONS = frozenset("png jpg jpeg gif svg webp bmp ico pdf js css".split())
# "version 3.10.2.1" has the shape of an address; these words just before a match veto it
VERSION_WORD_RE = _compile(
    r"(?i)(?<![A-Za-z])(?:version|ver\.?|release|build|v|版本号?)\s*[:：]?\s*$"
)

# first two digits of a resident ID: the province-level region (GB/T 2260)
CN_PROVINCES = frozenset(
    "11 12 13 14 15 21 22 23 31 32 33 34 35 36 37 41 42 43 44 45 46 50 51 52 53 54 "
    "61 62 63 64 65 71 81 82 91".split()
)
CN_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
CN_ID_CHECK = "10X98765432"  # ISO 7064 MOD 11-2: weighted sum mod 11 -> check character


# --- validators: pure, one rule each


def luhn_ok(digits: str) -> bool:
    """The Luhn mod-10 checksum every payment card number carries in its last digit."""
    if not digits.isascii() or not digits.isdigit():
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:  # every second digit from the right is doubled, 18 -> 1 + 8
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def card_ok(digits: str) -> bool:
    """A plausible payment card: 13-19 digits, an issuer prefix in use, and a valid Luhn digit.
    Luhn alone passes one random number in ten; the issuer rules drop ISBNs (978...), barcodes
    and year-stamped order numbers (2023...), which otherwise pass at that rate."""
    if not 13 <= len(digits) <= 19 or not luhn_ok(digits):
        return False
    # 18 digits with a birth year where a resident ID keeps it: an ID with a typo, not a card
    if len(digits) == 18 and digits[6:8] in ("19", "20"):
        return False
    # only Visa ever issued 13 digits; other 13-digit codes are mostly EAN-13 barcodes (690...)
    if len(digits) == 13:
        return digits[0] == "4"
    # Amex/Diners/JCB 3, Visa 4, Mastercard 51-55 and 2221-2720, Discover/UnionPay/Maestro 6
    return digits[0] in "3456" or 2221 <= int(digits[:4]) <= 2720


def cn_id_ok(s: str, today: datetime.date | None = None) -> bool:
    """A Chinese resident ID (GB 11643): region, a real birth date in [1900, today], sequence,
    and the ISO 7064 MOD 11-2 check character (0-9 or X)."""
    if len(s) != 18 or not s[:17].isascii() or not s[:17].isdigit():
        return False
    if s[:2] not in CN_PROVINCES:
        return False
    try:
        born = datetime.date(int(s[6:10]), int(s[10:12]), int(s[12:14]))
    except ValueError:  # month 13, February 30, ...
        return False
    if not datetime.date(1900, 1, 1) <= born <= (today or datetime.date.today()):
        return False
    check = CN_ID_CHECK[sum(int(c) * w for c, w in zip(s, CN_ID_WEIGHTS)) % 11]
    return s[17].upper() == check


def ssn_ok(s: str) -> bool:
    """A US Social Security number written AAA-GG-SSSS, with the ranges the SSA never issues
    (area 000, 666, 900-999; group 00; serial 0000) ruled out."""
    m = re.fullmatch(r"(\d{3})-(\d{2})-(\d{4})", s, re.ASCII)
    if not m:
        return False
    area, group, serial = m.groups()
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def email_ok(s: str) -> bool:
    """An e-mail address whose top-level domain is not a file extension: logo@2x.png is a retina
    image name, not a mailbox."""
    return s.rsplit(".", 1)[1].lower() not in FILE_EXTENSIONS


def ip_ok(s: str) -> bool:
    """An IPv4 or IPv6 address. IPv6 must show two non-empty groups and a digit, so `::1`-style
    stubs and C++ names like `Face::Bad` are left alone."""
    try:
        addr = ipaddress.ip_address(s)
    except ValueError:
        return False
    if addr.version == 6:
        groups = [g for g in s.split(":") if g]
        return len(groups) >= 2 and any(c.isdigit() for c in s)
    return True


def e164_ok(s: str) -> bool:
    """A +number: country code and subscriber number together hold 8 to 15 digits (E.164)."""
    return 8 <= len(re.sub(r"\D", "", s)) <= 15


def nanp_ok(s: str) -> bool:
    """A North American number: area code and exchange both start 2-9 (so 123-456-7890 fails)."""
    digits = re.sub(r"\D", "", s)
    if len(digits) == 11 and digits[0] == "1":  # the trunk prefix of 1-800-555-0199
        digits = digits[1:]
    return len(digits) == 10 and digits[0] in "23456789" and digits[3] in "23456789"


def cn_landline_ok(s: str) -> bool:
    """A Chinese landline: area code 010 or 02x (three digits) or 03xx-09xx (four), then a local
    number of 7-8 digits not starting with 0."""
    area = re.search(r"0\d+", s).group()
    local = re.sub(r"\D", "", s)[len(area) :]
    if len(area) == 3:
        area_ok = area == "010" or area[1] == "2"
    else:
        area_ok = area[1] in "3456789"
    return area_ok and 7 <= len(local) <= 8 and local[0] != "0"


# phone forms as (pattern, validator); None: the pattern's shape alone is the rule
PHONE_FORMS = [
    # international: +country code, an optional (area), then groups after single separators;
    # e164_ok counts the digits. Separators are required between digit groups: with optional
    # ones a long digit run splits into groups in millions of ways before the match fails.
    (
        r"(?<![0-9A-Za-z+])\+[1-9]\d{0,14}(?:[ \-.]?\(\d{1,4}\)[ \-.]?\d{1,12})?"
        r"(?:[ \-.]\d{1,12}){0,6}" + _NUM_END,
        e164_ok,
    ),
    # North American: (415) 555-0132, 415-555-0132, 415.555.0132, 1-800-555-0199
    (_NUM_START + r"(?:1[ \-.])?\(\d{3}\) ?\d{3}[\-.]\d{4}" + _NUM_END, nanp_ok),
    (_NUM_START + r"(?:1([ \-.]))?\d{3}([ \-.])\d{3}\2\d{4}" + _NUM_END, nanp_ok),
    # Chinese mobile: 1, then 3-9, then nine digits; grouped 3-4-4; optionally +86 or 0086
    (
        r"(?<![0-9A-Za-z+])(?<![0-9][.\-:/])(?:(?:\+|00)86[ \-]?)?"
        r"1[3-9]\d(?:\d{8}|([ \-])\d{4}\1\d{4})" + _NUM_END,
        None,
    ),
    # Chinese landline: 010-12345678, 021-8765-4321, 0755-12345678, (0755) 12345678
    (
        _NUM_START + r"(?:0\d{2,3}-|[(（]0\d{2,3}[)）] ?)(?:\d{7,8}|\d{3,4}-\d{4})" + _NUM_END,
        cn_landline_ok,
    ),
]
PHONE_RES = [(_compile(pattern), check) for pattern, check in PHONE_FORMS]
# a character each form cannot match without (any of them; "" = none): the `in` test runs in C,
# where a pattern opening with a lookbehind is tried at every position of the text
PHONE_NEEDS = ["+", "(（", "", "", "-(（"]


# --- candidates


def _candidates(text: str, types) -> list[tuple[int, int, str]]:
    """Every validated (start, end, type) match, overlapping ones included."""
    found = []

    def add(pattern, kind, ok=lambda s: True):
        for m in pattern.finditer(text):
            if ok(m.group()):
                found.append((m.start(), m.end(), kind))

    if "email" in types and "@" in text:
        add(EMAIL_RE, "email", email_ok)
    if "national_id" in types:
        add(CN_ID_RE, "national_id", cn_id_ok)
        if "-" in text:
            add(SSN_RE, "national_id", ssn_ok)
    if "credit_card" in types:
        for pattern in CARD_RES:
            add(pattern, "credit_card", lambda s: card_ok(re.sub(r"[ \-]", "", s)))
    if "ip" in types:
        for m in IPV4_RE.finditer(text):  # the veto reads the words before, not the match
            if not VERSION_WORD_RE.search(text, max(0, m.start() - 12), m.start()):
                found.append((m.start(), m.end(), "ip"))
        if ":" in text:
            add(IPV6_RE, "ip", ip_ok)
    if "phone" in types:
        for (pattern, check), needs in zip(PHONE_RES, PHONE_NEEDS):
            if not needs or any(c in text for c in needs):
                add(pattern, "phone", check or (lambda s: True))
    return found


def find_pii(text: str, types=PII_TYPES) -> list[tuple[int, int, str]]:
    """Non-overlapping (start, end, type) PII spans in text order. Overlaps go to the type of
    lower RANK, then to the longer span (+86 138 0013 8000 over its 138 0013 8000)."""
    unknown = set(types) - set(PII_TYPES)
    assert not unknown, f"unknown PII types {sorted(unknown)}; types are {PII_TYPES}"
    taken: list[tuple[int, int, str]] = []  # kept sorted, so one bisect finds the neighbours
    for start, end, kind in sorted(
        _candidates(text, set(types)), key=lambda c: (RANK[c[2]], c[0] - c[1], c[0])
    ):
        i = bisect.bisect_left(taken, (start,))
        if (i == 0 or taken[i - 1][1] <= start) and (i == len(taken) or end <= taken[i][0]):
            taken.insert(i, (start, end, kind))
    return taken


def scrub_pii(text: str, types=PII_TYPES) -> tuple[str, dict[str, int]]:
    """`text` with every PII span replaced by its placeholder, and how many of each type."""
    pieces, counts, pos = [], {}, 0
    for start, end, kind in find_pii(text, types):
        pieces += [text[pos:start], PLACEHOLDERS[kind]]
        counts[kind] = counts.get(kind, 0) + 1
        pos = end
    pieces.append(text[pos:])
    return "".join(pieces), counts


# --- evaluation against a labelled file


def _scores(tp: int, predicted: int, true: int) -> dict:
    return {
        "precision": tp / predicted if predicted else 1.0,
        "recall": tp / true if true else 1.0,
        "tp": tp,
        "predicted": predicted,
        "true": true,
    }


def measure(path: str | Path) -> dict:
    """Precision and recall of find_pii per type and overall, on a JSONL file of
    {"text", "spans": [{"start", "end", "type"}]}. A prediction counts only with the same type and
    the exact same offsets: a span that stops one character short still leaks that character."""
    counts = {kind: [0, 0, 0] for kind in PII_TYPES}  # true positives, predicted, true
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        gold = {(span["start"], span["end"], span["type"]) for span in row["spans"]}
        for span in find_pii(row["text"]):
            counts[span[2]][0] += span in gold
            counts[span[2]][1] += 1
        for span in gold:
            counts[span[2]][2] += 1
    report = {kind: _scores(*c) for kind, c in counts.items()}
    report["overall"] = _scores(*(sum(c[i] for c in counts.values()) for i in range(3)))
    return report
