from __future__ import annotations

import time
from collections import Counter

import pytest
from pydantic import ValidationError

from transferdesk.review.redaction import (
    TOKENS,
    RedactionConfig,
    Redactor,
    iban_valid,
    luhn_valid,
)

SAFE = [r"ORD-\d+", r"1Z[0-9A-Z]{16}"]


@pytest.fixture(scope="module")
def redactor() -> Redactor:
    return Redactor(RedactionConfig(safe_patterns=SAFE))


# --- cards -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("my card 4111 1111 1111 1111 was charged twice", "my card [CARD] was charged twice"),
        ("charged on 4111-1111-1111-1111 yesterday", "charged on [CARD] yesterday"),
        ("card number:4111111111111111", "card number:[CARD]"),
        ("amex 3782 822463 10005 please cancel", "amex [CARD] please cancel"),
        ("mastercard 5555 5555 5555 4444 exp 12/26", "mastercard [CARD] exp 12/26"),
        # A CVV or a reference glued on as one more group must not hide the card.
        ("card 4111 1111 1111 1111 123", "card [CARD] 123"),
        ("ref 12 4111 1111 1111 1111", "ref 12 [CARD]"),
    ],
)
def test_cards(redactor: Redactor, text: str, expected: str) -> None:
    assert redactor.redact(text) == expected


def test_luhn_failing_number_is_not_a_card_but_a_number(redactor: Redactor) -> None:
    assert not luhn_valid("4111111111111112")
    text, counts = redactor.redact_counts("my card 4111111111111112 was declined")
    assert text == "my card [NUMBER] was declined"
    assert counts == Counter(number=1)


def test_spaced_luhn_failing_groups_are_left_alone(redactor: Redactor) -> None:
    # Groups of four are below the digit-run length, and no card check passes.
    text = "code 4111 1111 1111 1112 from the letter"
    assert redactor.redact(text) == text


# --- IBANs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("please refund to GB82 WEST 1234 5698 7654 32", "please refund to [IBAN]"),
        ("please refund to GB82WEST12345698765432 thanks", "please refund to [IBAN] thanks"),
        ("refund to gb82 west 1234 5698 7654 32 asap", "refund to [IBAN] asap"),
        ("my iban is DE89 3704 0044 0532 0130 00.", "my iban is [IBAN]."),
        # A short word after the last group is matched along with it, then trimmed off.
        ("BE68 5390 0754 7034 when will it arrive", "[IBAN] when will it arrive"),
    ],
)
def test_ibans(redactor: Redactor, text: str, expected: str) -> None:
    assert redactor.redact(text) == expected


def test_iban_with_bad_checksum_is_not_an_iban(redactor: Redactor) -> None:
    assert iban_valid("GB82 WEST 1234 5698 7654 32")
    assert not iban_valid("GB83 WEST 1234 5698 7654 32")
    text, counts = redactor.redact_counts("please refund to GB83 WEST 1234 5698 7654 32")
    assert "[IBAN]" not in text
    assert "GB83 WEST" in text
    assert counts["iban"] == 0


# --- e-mails ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("write to jane.doe+shop@example.co.uk please", "write to [EMAIL] please"),
        ("Email: J.Smith@Mail.Example.COM.", "Email: [EMAIL]."),
        ("<bob_99@corp-mail.de>", "<[EMAIL]>"),
    ],
)
def test_emails(redactor: Redactor, text: str, expected: str) -> None:
    assert redactor.redact(text) == expected


def test_at_sign_without_an_address_is_kept(redactor: Redactor) -> None:
    text = "meet @ the store, I tweeted @northwind about it"
    assert redactor.redact(text) == text


# --- phones ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "phone",
    [
        "+44 20 7946 0958",
        "+44 (0)20 7946 0958",
        "+1 (555) 123-4567",
        "+1-555-123-4567",
        "0044 20 7946 0958",
        "+447700900123",
        "+33 6 12 34 56 78",
        "(555) 123-4567",
        "555-123-4567",
        "555.123.4567",
        "1-555-123-4567",
        "07700 900123",
        "020 7946 0958",
        "(020) 7946 0958",
        "06 12 34 56 78",
    ],
)
def test_phones(redactor: Redactor, phone: str) -> None:
    text, counts = redactor.redact_counts(f"call me on {phone}, after 5pm")
    assert text == "call me on [PHONE], after 5pm"
    assert counts == Counter(phone=1)


def test_phone_does_not_swallow_a_following_small_number(redactor: Redactor) -> None:
    assert redactor.redact("+44 20 7946 0958 2 items missing") == "[PHONE] 2 items missing"


# --- what must stay ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "I ordered 2 items on 2024-05-01 for £49.99",
        "delivery was due 01/05/2024 between 10:30 and 12:00",
        "dates 01.05.2024, 01-05-2024, 05-01-2024 and 2024.05.01",
        "slot 10:30-11:45 please",
        "the sofa cost £1,250.00, the lamp $49.99 and I paid 1,000 in total",
        "European prices: 1.250.000,00 EUR",
        "order 12345, room 404, 2 items, version 1.2.3",
        "my parcel ORD-20240501 hasn't arrived",
        "tracking number 1Z999AA10123456784",
        "Hi, my parcel hasn't arrived, can you check?",
        "",
    ],
)
def test_unchanged(redactor: Redactor, text: str) -> None:
    assert redactor.redact_counts(text) == (text, Counter())


def test_safe_patterns_are_what_protects_identifiers() -> None:
    plain = Redactor()
    assert plain.redact("my parcel ORD-20240501 hasn't arrived") == "my parcel ORD-[NUMBER] hasn't arrived"
    assert plain.redact("tracking number 1Z999AA10123456784") == "tracking number 1Z999AA[NUMBER]"


def test_safe_pattern_protects_from_every_rule() -> None:
    r = Redactor(RedactionConfig(safe_patterns=[r"REF:\S+", r"(?i)support@northwind\.example"]))
    text = "REF:4111111111111111 and REF:+447700900123, write to Support@Northwind.example"
    assert r.redact(text) == text
    assert r.redact("or to jane@example.com") == "or to [EMAIL]"


# --- configuration ---------------------------------------------------------------------------


def test_disabled_returns_text_unchanged() -> None:
    r = Redactor(RedactionConfig(enabled=False))
    text = "card 4111 1111 1111 1111, mail jane@example.com, call +44 20 7946 0958"
    assert not r.enabled
    assert r.redact_counts(text) == (text, Counter())


@pytest.mark.parametrize(
    ("switch", "text"),
    [
        ("emails", "mail jane.doe@example.com"),
        ("phones", "call +44 20 7946 0958"),
        ("cards", "card 4111 1111 1111 1111"),
        ("ibans", "to GB82 WEST 1234 5698 7654 32"),
    ],
)
def test_each_rule_switch(switch: str, text: str) -> None:
    kind = switch.removesuffix("s")
    assert TOKENS[kind] in Redactor(RedactionConfig()).redact(text)  # type: ignore[index]
    off = Redactor(RedactionConfig(**{switch: False})).redact(text)
    assert TOKENS[kind] not in off  # type: ignore[index]
    if switch != "ibans":  # the IBAN's digit groups may still look like a card
        assert off == text


def test_digit_runs_length_and_off() -> None:
    text = "customer 12345678, account 1234567"
    assert Redactor().redact(text) == "customer [NUMBER], account 1234567"
    assert Redactor(RedactionConfig(digit_runs=6)).redact(text) == "customer [NUMBER], account [NUMBER]"
    assert Redactor(RedactionConfig(digit_runs=None)).redact(text) == text
    unchecked = "card 1234567812345678"
    assert Redactor(RedactionConfig(digit_runs=None)).redact(unchecked) == unchecked


def test_bad_safe_pattern_is_a_clear_error() -> None:
    with pytest.raises(
        ValidationError, match=r"safe_patterns: 'ORD-\(\\d\+' is not a valid regular expression \(missing \)"
    ):
        RedactionConfig(safe_patterns=[r"ORD-\d+", r"ORD-(\d+"])


def test_unknown_key_is_refused() -> None:
    with pytest.raises(ValidationError):
        RedactionConfig(email=True)  # type: ignore[call-arg]


# --- counts and speed ----------------------------------------------------------------------------


def test_counts_per_kind(redactor: Redactor) -> None:
    text = (
        "Hi, I'm jane.doe@example.com (alt: jd@example.org). Card 4111 1111 1111 1111 was charged "
        "twice for ORD-20240501; refund to GB82 WEST 1234 5698 7654 32 or call 07700 900123 / "
        "+1 (555) 123-4567. Customer no. 99887766."
    )
    out, counts = redactor.redact_counts(text)
    assert counts == Counter(email=2, card=1, iban=1, phone=2, number=1)
    assert out == (
        "Hi, I'm [EMAIL] (alt: [EMAIL]). Card [CARD] was charged "
        "twice for ORD-20240501; refund to [IBAN] or call [PHONE] / "
        "[PHONE]. Customer no. [NUMBER]."
    )
    assert redactor.redact(text) == out


def test_long_adversarial_input_stays_fast(redactor: Redactor) -> None:
    texts = ["1" * 50_000, "1-" * 25_000, "12 " * 15_000, "a." * 25_000 + "@", ("+1 " + "12 " * 10) * 1_000]
    started = time.perf_counter()
    for text in texts:
        redactor.redact(text)
    assert time.perf_counter() - started < 5
