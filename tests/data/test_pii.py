"""PII scrubbing: each validator on known good and bad values, each type through find_pii and
scrub_pii, CJK-surrounded text, and precision/recall on the hand-labelled file."""

import datetime
import json
from pathlib import Path

import pytest

from lmforge.config import PII_TYPES
from lmforge.data.pii import (
    PLACEHOLDERS,
    card_ok,
    cn_id_ok,
    cn_landline_ok,
    e164_ok,
    email_ok,
    find_pii,
    ip_ok,
    luhn_ok,
    measure,
    nanp_ok,
    scrub_pii,
    ssn_ok,
)

LABELLED = Path(__file__).parent / "pii_labelled.jsonl"


def found(text, types=PII_TYPES):
    """The (substring, type) pairs find_pii reports: easier to read in a failing assert."""
    return [(text[s:e], kind) for s, e, kind in find_pii(text, types)]


# --------------------------------------------------------------------------- validators


def test_luhn():
    for good in ["4111111111111111", "79927398713", "378282246310005", "6011111111111117"]:
        assert luhn_ok(good), good
    for bad in ["4111111111111112", "1234567812345678", "79927398710", "", "4111-1111"]:
        assert not luhn_ok(bad), bad


def test_card_issuer_rules():
    assert card_ok("5555555555554444") and card_ok("2221000000000009")
    assert card_ok("4222222222222")  # the one 13-digit Visa test number
    assert not card_ok("9780306406157")  # ISBN-13, Luhn-valid, but no card starts with 9
    assert not card_ok("6901234567892")  # EAN-13 barcode, Luhn-valid, not a Visa
    assert not card_ok("20231105008812345")  # Luhn-valid order number stamped with a year
    assert not card_ok("411111111111")  # 12 digits: too short
    assert not card_ok("4111111111111112")  # Luhn fails


def test_cn_id_checksum_and_dates():
    assert cn_id_ok("110101199003071233")
    assert cn_id_ok("44010619870915101X")  # check value 10 is written X
    assert cn_id_ok("31010419951103200x")  # lower-case x is the same character
    assert cn_id_ok("420102200002290316")  # 29 February 2000 existed
    assert not cn_id_ok("110101199003071234")  # wrong check digit
    assert not cn_id_ok("440106198709151010")  # X replaced by 0
    assert not cn_id_ok("110101199913401238")  # month 13, right check digit
    assert not cn_id_ok("440305202302304567")  # 30 February
    assert not cn_id_ok("510107189912315673")  # born before 1900
    assert not cn_id_ok("990101199003071237")  # no province 99
    assert not cn_id_ok("11010119900307123")  # 17 characters
    future = "310115203001012349"  # born 1 January 2030
    assert not cn_id_ok(future, today=datetime.date(2029, 12, 31))
    assert cn_id_ok(future, today=datetime.date(2030, 1, 1))


def test_ssn_rules():
    for good in ["123-45-6789", "078-05-1120", "899-99-9999", "665-01-0001"]:
        assert ssn_ok(good), good
    for bad in ["000-12-3456", "666-45-6789", "900-12-3456", "999-12-3456", "123-00-4567"]:
        assert not ssn_ok(bad), bad
    assert not ssn_ok("123-45-0000") and not ssn_ok("123456789")


def test_ip_phone_email_validators():
    assert ip_ok("192.168.1.1") and ip_ok("2001:db8::1") and ip_ok("::ffff:192.0.2.128")
    assert not ip_ok("999.1.1.1") and not ip_ok("12:30:45") and not ip_ok("00:1A:2B:3C:4D:5E")
    assert not ip_ok("::1")  # one group: not enough to call it an address in prose
    assert not ip_ok("Face::Bad")  # a C++ scope that happens to be hexadecimal
    assert e164_ok("+44 20 7946 0958") and not e164_ok("+12.5") and not e164_ok("+1234567890123456")
    assert nanp_ok("(415) 555-0132") and nanp_ok("1-800-555-0199")
    assert not nanp_ok("123-456-7890") and not nanp_ok("415-055-0132")
    assert cn_landline_ok("010-12345678") and cn_landline_ok("0755-12345678")
    assert cn_landline_ok("021-8765-4321") and cn_landline_ok("（010）12345678")
    assert not cn_landline_ok("011-12345678")  # 01x other than 010 is not an area code
    assert not cn_landline_ok("0755-01234567")  # local numbers never start with 0
    assert email_ok("a.b@example.com") and not email_ok("logo@2x.png")


# --------------------------------------------------------------------------- find_pii / scrub_pii


def test_email():
    assert found("Mail jane.doe+tag@mail.example.org.") == [
        ("jane.doe+tag@mail.example.org", "email")
    ]
    assert found("<li.wei@example.com>, 123456789@qq.com") == [
        ("li.wei@example.com", "email"),
        ("123456789@qq.com", "email"),  # a QQ number as local part stays one e-mail
    ]
    assert found("see logo@2x.png, @github, user@localhost, a@b") == []


def test_phone_positives():
    numbers = [
        "+1 415 555 0132",
        "+44 20 7946 0958",
        "+86 138 0013 8000",
        "+8613800138000",
        "0086-13800138000",
        "(415) 555-0132",
        "415-555-0132",
        "415.555.0132",
        "1-800-555-0199",
        "13800138000",
        "138-0013-8000",
        "138 0013 8000",
        "010-12345678",
        "021-8765-4321",
        "0755-12345678",
    ]
    for number in numbers:
        assert found(f"call {number} now") == [(number, "phone")], number


def test_phone_negatives():
    for text in [
        "founded in 1998, public in 2004",
        "on 2023-10-05 at 14:30:00",
        "price $1,299.99 or ¥1380.00",
        "version 1.2.3 and 10.0.19045.2965",
        "ISBN 978-0-306-40615-7 and 0-306-40615-2",
        "serial 4155550132, part 415-555-01324",
        "batch 13800138000123",  # 14 digits: part of a longer number
        "a=3.13800138000",  # decimals are not phones
        "invalid 123-456-7890",  # NANP area codes never start with 1
        "+12.5% growth",
    ]:
        assert found(text) == [], text


def test_ip():
    assert found("from 203.0.113.77 port 22, client=2001:db8:85a3::8a2e:370:7334") == [
        ("203.0.113.77", "ip"),
        ("2001:db8:85a3::8a2e:370:7334", "ip"),
    ]
    assert found("[fe80::1ff:fe23:4567:890a]:8080") == [("fe80::1ff:fe23:4567:890a", "ip")]
    assert found("range 10.0.0.1-10.0.0.255") == [("10.0.0.1", "ip"), ("10.0.0.255", "ip")]
    for text in [
        "bad 999.1.1.1 and 300.168.1.1 and 1.2.3.256",
        "upgrade to 1.2.3.4.5",
        "version 3.10.2.1",
        "版本号：3.10.2.1",
        "at 12:30:45",
        "MAC 00:1A:2B:3C:4D:5E",
        "std::vector and Foo::Bar",
    ]:
        assert found(text) == [], text


def test_credit_card():
    for number in [
        "4111 1111 1111 1111",
        "5555-5555-5555-4444",
        "3782 822463 10005",
        "4000000000000002",
    ]:
        assert found(f"card {number}, exp 12/27") == [(number, "credit_card")], number
    for text in [
        "order 4111111111111112",  # Luhn fails
        "card 4111 1111 1111 1112",
        "ref 1234 5678 9012 3456",
        "ISBN-13: 9780306406157",
        "code 41111111111111111111",  # 20 digits
        "mixed 4111 1111-1111 1111",  # separators must agree
    ]:
        assert found(text) == [], text


def test_national_id():
    assert found("SSN: 123-45-6789; ID 44010619870915101X") == [
        ("123-45-6789", "national_id"),
        ("44010619870915101X", "national_id"),
    ]
    for text in [
        "SSN 666-45-6789 or 000-12-3456",
        "ID 110101199003071234",  # wrong check digit
        "ID 110101199913401238",  # month 13
        "ID 1101011990030712331",  # 19 digits
        "date 2023-10-05, zip 62701-1234",
    ]:
        assert found(text) == [], text


def test_precedence():
    # a mobile number as an e-mail's local part: the e-mail wins the overlap
    assert found("13800138000@163.com") == [("13800138000@163.com", "email")]
    assert found("13800138000@163.com", types=("phone",)) == [("13800138000", "phone")]
    # +86 with its number is one phone, not a shorter mobile inside it
    assert found("tel +86 138 0013 8000") == [("+86 138 0013 8000", "phone")]


def test_scrub_placeholders_counts_and_untouched_text():
    text = (
        "Mail a.b@example.com, call 415-555-0132 or 13800138000, host 10.0.0.1, "
        "card 4111 1111 1111 1111, ID 110101199003071233, SSN 123-45-6789."
    )
    scrubbed, counts = scrub_pii(text)
    assert scrubbed == (
        "Mail <EMAIL>, call <PHONE> or <PHONE>, host <IP>, card <CREDIT_CARD>, ID <ID>, SSN <ID>."
    )
    assert counts == {"email": 1, "phone": 2, "ip": 1, "credit_card": 1, "national_id": 2}
    assert scrub_pii("nothing here, 2023-10-05, v1.2.3") == ("nothing here, 2023-10-05, v1.2.3", {})


def test_scrub_only_requested_types():
    text = "a.b@example.com 415-555-0132"
    assert scrub_pii(text, types=("phone",)) == ("a.b@example.com <PHONE>", {"phone": 1})
    assert scrub_pii(text, types=()) == (text, {})
    with pytest.raises(AssertionError, match="unknown PII types"):
        find_pii(text, types=("address",))


def test_chinese_surroundings():
    text = (
        "请发邮件到zhang.san@example.com联系，手机13800138000，座机（010）12345678，"
        "身份证110101199003071233，服务器10.0.12.7，卡号6222021000123450。"
    )
    assert found(text) == [
        ("zhang.san@example.com", "email"),
        ("13800138000", "phone"),
        ("（010）12345678", "phone"),
        ("110101199003071233", "national_id"),
        ("10.0.12.7", "ip"),
        ("6222021000123450", "credit_card"),
    ]
    assert scrub_pii("邮箱wang.wu@example.com.cn谢谢") == ("邮箱<EMAIL>谢谢", {"email": 1})
    assert found("2023年10月5日，售价￥1380.00元，订单号202310051234567。") == []


# --------------------------------------------------------------------------- labelled file


def test_scrub_keeps_text_outside_spans():
    for line in LABELLED.read_text(encoding="utf-8").splitlines():
        text = json.loads(line)["text"]
        spans = find_pii(text)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), text  # sorted, disjoint
        scrubbed, counts = scrub_pii(text)
        assert sum(counts.values()) == len(spans)
        # put each span back in place of its placeholder, in order: the original must return
        for start, end, kind in spans:
            scrubbed = scrubbed.replace(PLACEHOLDERS[kind], text[start:end], 1)
        assert scrubbed == text


def test_labelled_file_precision_recall():
    report = measure(LABELLED)
    print(f"\n{'type':<12} {'precision':>9} {'recall':>7} {'tp':>4} {'pred':>5} {'true':>5}")
    for kind, r in report.items():
        print(
            f"{kind:<12} {r['precision']:9.3f} {r['recall']:7.3f} "
            f"{r['tp']:4d} {r['predicted']:5d} {r['true']:5d}"
        )
    assert all(r["true"] > 0 for r in report.values())  # the file covers every type
    assert report["overall"]["precision"] >= 0.95
    assert report["overall"]["recall"] >= 0.95
