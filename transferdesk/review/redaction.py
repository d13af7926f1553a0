"""Redaction of personal data from customer messages before they are stored for review.

Captured live messages pass through `Redactor.redact` before the review store sees them, so
what reviewers read (and what is later exported as training data) carries placeholders
instead of the customer's contact and payment details.

What is caught, each replaced by a token:

- ``[EMAIL]`` e-mail addresses (``jane.doe+shop@example.co.uk``).
- ``[IBAN]`` IBANs, compact or in groups of four, any letter case, only when the ISO 13616
  mod-97 check digits are right.
- ``[CARD]`` payment card numbers: 13 to 19 digits, possibly in groups separated by single
  spaces or dashes, only when they pass the Luhn check.
- ``[PHONE]`` phone numbers: international ones starting with ``+`` or ``00``
  (``+44 20 7946 0958``, ``+1 (555) 123-4567``, ``0044 20 7946 0958``, ``+447700900123``),
  North American ones with separators (``(555) 123-4567``, ``555-123-4567``) and national
  numbers with a leading 0 and separators (``07700 900123``, ``020 7946 0958``,
  ``06 12 34 56 78``).
- ``[NUMBER]`` any other run of at least ``digit_runs`` (default 8) consecutive digits:
  account and customer numbers, card numbers that fail the Luhn check, phone numbers typed
  without separators or a ``+``.

What is left alone on purpose: dates (``2024-05-01``, ``01/05/2024``), times (``10:30``),
money amounts (``£1,250.00``, ``$49.99``), short numbers (``order 12345``, ``room 404``) and
anything matched by one of the configured ``safe_patterns`` (order or tracking numbers).

What is NOT caught: names, street addresses and postcodes, dates of birth (dates are kept,
in digits or in words), numbers written in words ("four one one one ..."), phone numbers of
fewer than eight digits or in a format not listed above, card numbers whose groups are split
by other characters, and national ID, passport or licence numbers shorter than
``digit_runs`` digits or containing letters. Redaction is pattern matching, not
understanding: it lowers the amount of personal data in the store, it does not guarantee
there is none.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Literal

from pydantic import Field, field_validator

from transferdesk.config import Section

Kind = Literal["email", "iban", "card", "phone", "number"]

TOKENS: dict[Kind, str] = {
    "email": "[EMAIL]",
    "iban": "[IBAN]",
    "card": "[CARD]",
    "phone": "[PHONE]",
    "number": "[NUMBER]",
}


class RedactionConfig(Section):
    """What `Redactor` removes from captured messages before they are stored."""

    enabled: bool = Field(True, description="Redact captured messages; off: store them verbatim.")
    emails: bool = Field(True, description="Replace e-mail addresses with [EMAIL].")
    phones: bool = Field(True, description="Replace phone numbers with [PHONE].")
    cards: bool = Field(
        True, description="Replace payment card numbers (13-19 digits, Luhn-valid) with [CARD]."
    )
    ibans: bool = Field(True, description="Replace IBANs (mod-97 valid, spaced or not) with [IBAN].")
    digit_runs: int | None = Field(
        8,
        ge=1,
        description="Replace any other run of at least this many consecutive digits with [NUMBER]; "
        "unset: keep them.",
    )
    safe_patterns: list[str] = Field(
        default_factory=list,
        description="Regular expressions of identifiers never to redact (order numbers such as "
        r"'ORD-\d{6,}', tracking numbers); a match is protected from every rule.",
    )

    @field_validator("safe_patterns")
    @classmethod
    def _patterns_compile(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(
                    f"safe_patterns: '{pattern}' is not a valid regular expression ({exc})"
                ) from None
        return patterns


# Fast path: every rule needs a digit or an '@', and most chat messages have neither.
_NEEDS_WORK = re.compile(r"[\d@]")

_EMAIL = re.compile(
    # The lookbehind pins the start to the beginning of the local part, which keeps long
    # '@'-less words linear instead of rescanning them from every position.
    r"(?<![\w.%+-])[\w.%+-]+@[\w-]+(?:\.[\w-]+)*\.[^\W\d_]{2,}(?![\w-])"
)

# Groups of exactly four (as IBANs are printed) with optional single spaces; a compact IBAN
# then splits in only one way, so a failed match cannot backtrack combinatorially.
_IBAN = re.compile(
    r"(?<![A-Z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?(?![A-Z0-9])",
    re.IGNORECASE,
)

# No issuer number starts with 0, and a '+' in front makes it a phone: both keep spaced
# international phone numbers (14 digits, one in ten Luhn-valid by chance) out of [CARD].
_CARD = re.compile(r"(?<![\w+])[1-9](?:[ -]?\d){12,18}(?!\w)")

_PHONES: tuple[re.Pattern[str], ...] = (
    # International with separators: country code, optional "(0)" or "(555)", digit groups.
    # Separators are required between groups so a digit string splits in only one way.
    re.compile(
        r"(?<![\w+])(?:\+|00) ?[1-9]\d{0,3}"
        r"(?:(?:[ .-]?\(\d{1,4}\)[ .-]?\d{1,12})|[ .-]\d{1,12})"
        r"(?:[ .-]\d{2,12}){0,5}(?!\d)"
    ),
    # International without separators: only the '+' makes it recognisable as a phone.
    re.compile(r"(?<![\w+])\+[1-9]\d{7,14}(?!\d)"),
    # North American: 3-3-4 with separators. The second lookbehind and the lookahead refuse
    # to start or stop inside a longer dashed or dotted number.
    re.compile(r"(?<![\w+])(?<!\d[.-])(?:1[ .-])?(?:\(\d{3}\) ?|\d{3}[ .-])\d{3}[ .-]\d{4}(?!\w|[.-]\d)"),
    # National with a trunk 0 and at least one separator: 07700 900123, (020) 7946 0958.
    # Dates never match: their groups after the first are 2 digits, these need 3 or 4.
    re.compile(r"(?<![\w+])(?<!\d[.-])(?:\(0\d{1,4}\) ?|0\d{1,4}[ .-])\d{3,4}[ .-]?\d{3,4}(?!\w|[.-]\d)"),
    # French style: 06 12 34 56 78.
    re.compile(r"(?<![\w+])(?<!\d[.-])0[1-9](?:[ .]\d{2}){4}(?!\w|[.-]\d)"),
)

_PHONE_DIGITS = (8, 15)  # E.164 allows 15; below 8 the match is more likely not a phone
_SEPARATOR = re.compile(r"[ -]")
_SPACE = re.compile(" ")


def luhn_valid(digits: str) -> bool:
    """Whether a string of digits passes the Luhn check used by payment card numbers."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)  # not ord() arithmetic: \d also matches non-ASCII digits
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_valid(iban: str) -> bool:
    """Whether an IBAN (spaces allowed, any case) has the right ISO 13616 mod-97 check digits."""
    s = iban.replace(" ", "").upper()
    # isascii: case-insensitive [A-Z] also matches 'ſ' and the Kelvin sign, which int(c, 36) refuses.
    if not (15 <= len(s) <= 34 and s.isascii() and s[:2].isalpha() and s[2:4].isdigit() and s.isalnum()):
        return False
    rearranged = s[4:] + s[:4]
    # int(c, 36) maps 0-9 to themselves and A-Z to 10-35, as the standard prescribes.
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def _pieces(text: str, start: int, end: int, separator: re.Pattern[str]) -> list[tuple[int, int]]:
    """Spans of the separator-delimited pieces of text[start:end]."""
    spans, pos = [], start
    for sep in separator.finditer(text, start, end):
        spans.append((pos, sep.start()))
        pos = sep.end()
    spans.append((pos, end))
    return spans


class Redactor:
    """Replaces personal data in text by tokens, as its `RedactionConfig` says.

    Built once (regular expressions are compiled at import or here, never per call) and
    immutable afterwards, so one
    instance can serve every capture thread.
    """

    def __init__(self, config: RedactionConfig | None = None) -> None:
        self.config = config or RedactionConfig()
        self._safe = tuple(re.compile(p) for p in self.config.safe_patterns)
        self._digit_run = (
            re.compile(rf"(?<!\d)\d{{{self.config.digit_runs},}}(?!\d)")
            if self.config.digit_runs is not None
            else None
        )
        self._rules: list[Callable[[str, bytearray], Iterator[tuple[int, int, Kind]]]] = []
        if self.config.emails:
            self._rules.append(self._emails)
        if self.config.ibans:
            self._rules.append(self._ibans)
        if self.config.cards:
            self._rules.append(self._cards)
        if self.config.phones:
            self._rules.append(self._phones)
        if self._digit_run is not None:
            self._rules.append(self._digit_runs)

    @property
    def enabled(self) -> bool:
        return self.config.enabled and bool(self._rules)

    def redact(self, text: str) -> str:
        """The text with personal data replaced by tokens such as [EMAIL] and [CARD]."""
        return self.redact_counts(text)[0]

    def redact_counts(self, text: str) -> tuple[str, Counter[str]]:
        """The redacted text, and how many spans of each kind ("email", "card", ...) were replaced."""
        counts: Counter[str] = Counter()
        if not self.enabled or not _NEEDS_WORK.search(text):
            return text, counts
        # Rules run on the original text and claim spans in a mask: a later rule cannot touch
        # what a safe pattern or an earlier rule claimed, and offsets never shift under it.
        claimed = bytearray(len(text))
        for pattern in self._safe:
            for m in pattern.finditer(text):
                claimed[m.start() : m.end()] = b"\x01" * (m.end() - m.start())
        found: list[tuple[int, int, Kind]] = []
        for rule in self._rules:
            for start, end, kind in rule(text, claimed):
                claimed[start:end] = b"\x01" * (end - start)
                found.append((start, end, kind))
        if not found:
            return text, counts
        found.sort()
        parts, pos = [], 0
        for start, end, kind in found:
            parts.append(text[pos:start])
            parts.append(TOKENS[kind])
            counts[kind] += 1
            pos = end
        parts.append(text[pos:])
        return "".join(parts), counts

    # Each rule yields the spans it redacts; a span is taken only if nothing in it is claimed.
    # The caller claims every span before asking for the next, so a rule also sees its own.

    @staticmethod
    def _free(claimed: bytearray, start: int, end: int) -> bool:
        return claimed.find(1, start, end) == -1

    def _emails(self, text: str, claimed: bytearray) -> Iterator[tuple[int, int, Kind]]:
        for m in _EMAIL.finditer(text):
            if self._free(claimed, m.start(), m.end()):
                yield m.start(), m.end(), "email"

    def _ibans(self, text: str, claimed: bytearray) -> Iterator[tuple[int, int, Kind]]:
        for m in _IBAN.finditer(text):
            # A short word after the last group ("... 7034 when") is swallowed as a group of
            # its own, so shorter prefixes (at spaces) get a chance when the whole fails.
            pieces = _pieces(text, m.start(), m.end(), _SPACE)
            for n in range(len(pieces), 0, -1):
                start, end = m.start(), pieces[n - 1][1]
                if self._free(claimed, start, end) and iban_valid(text[start:end]):
                    yield start, end, "iban"
                    break

    def _cards(self, text: str, claimed: bytearray) -> Iterator[tuple[int, int, Kind]]:
        for m in _CARD.finditer(text):
            pieces = _pieces(text, m.start(), m.end(), _SEPARATOR)
            groups = [text[a:b] for a, b in pieces]
            # The match may carry a neighbouring group (a CVV, a reference), so contiguous runs
            # of groups are tried too, most digits first, and the card itself is still found.
            ends = [0]
            for g in groups:
                ends.append(ends[-1] + len(g))
            windows = sorted(
                (
                    (ends[i] - ends[j + 1], i, j)
                    for i in range(len(groups))
                    for j in range(i, len(groups))
                    if 13 <= ends[j + 1] - ends[i] <= 19 and groups[i][0] != "0"
                ),
            )
            for _, i, j in windows:
                start, end = pieces[i][0], pieces[j][1]
                if self._free(claimed, start, end) and luhn_valid("".join(groups[i : j + 1])):
                    yield start, end, "card"
                    break

    def _phones(self, text: str, claimed: bytearray) -> Iterator[tuple[int, int, Kind]]:
        low, high = _PHONE_DIGITS
        for pattern in _PHONES:
            for m in pattern.finditer(text):
                start, end = m.start(), m.end()
                digits = sum(ch.isdigit() for ch in m.group())
                if m.group().startswith("00"):
                    digits -= 2
                if low <= digits <= high and self._free(claimed, start, end):
                    yield start, end, "phone"

    def _digit_runs(self, text: str, claimed: bytearray) -> Iterator[tuple[int, int, Kind]]:
        assert self._digit_run is not None
        for m in self._digit_run.finditer(text):
            if self._free(claimed, m.start(), m.end()):
                yield m.start(), m.end(), "number"
