"""The email check's fast path accepts nothing that Django's ``validate_email`` rejects."""

import random

import pytest
from django.core.exceptions import ValidationError
from django.core.validators import validate_email

from users.profile import is_plain_email, is_valid_email

TRICKY = [
    "user@example.com",
    "User.Name+tag@Example.CO.uk",
    "a@b.co",
    "a@b.c",
    "a@b",
    "a@localhost",
    "a@LOCALHOST",
    "@example.com",
    "a@",
    "a@@example.com",
    "a@b@example.com",
    ".a@example.com",
    "a.@example.com",
    "a..b@example.com",
    "a@.example.com",
    "a@example..com",
    "a@example.com.",
    "a@-example.com",
    "a@example-.com",
    "a@example.-com",
    "a@example.com-",
    "a@example.c-m",
    "a@example.xn--p1ai",
    "a@example.xn--",
    "a@example.123",
    "a@123.example.com",
    "a@" + "x" * 63 + ".com",
    "a@" + "x" * 64 + ".com",
    "a@example." + "c" * 63,
    "a@example." + "c" * 64,
    "a" * 64 + "@example.com",
    "a" * 310 + "@example.com",
    "a" * 320 + "@example.com",
    "x@" + ".".join(["a" * 60] * 5) + ".com",
    '"quoted local"@example.com',
    '"a\\"b"@example.com',
    "o'brien@example.com",
    "a!#$%&'*+/=?^_`{}|~-b@example.com",
    "a b@example.com",
    "a@exa mple.com",
    "a@example.com\n",
    "\na@example.com",
    "a@[127.0.0.1]",
    "a@[::1]",
    "a@[IPv6:::1]",
    "a@[999.1.1.1]",
    "jörg@example.com",
    "a@bücher.de",
    "a@example.рф",
    "a@xn--bcher-kva.de",
    "a\u017f@example.com",
    "a@example.\u212a\u212a",
    "a@ex\u0131mple.com",
    "a@example.com\u200b",
    "ａ@example.com",
    "a@example.ｃｏｍ",
    "",
    "@",
    "a",
    "a@b.-",
    "_@_.com",
    "a@_example.com",
    "a@example_.com",
    "+@x.io",
    "-@x-y.io",
]


def django_accepts(email: str) -> bool:
    try:
        validate_email(email)
    except ValidationError:
        return False
    return True


@pytest.mark.parametrize("email", TRICKY)
def test_it_agrees_with_validate_email_on_tricky_addresses(email):
    assert is_valid_email(email) == django_accepts(email)
    if is_plain_email(email):
        assert django_accepts(email), "the fast path accepted what Django rejects"


def test_it_agrees_with_validate_email_on_random_addresses():
    rng = random.Random(20261123)
    alphabet = "aZ09.-_+@'\"!#~ [](){}:;,\\ä\u0131\u017f\u212a\t"
    words = ["example", "com", "xn--", "co", "a", "b1", "-", "_", "+", "x" * 62, "localhost", "1", "ä"]
    fast_hits = 0
    for _ in range(30000):
        if rng.random() < 0.3:
            email = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 14)))
        else:
            # Near-plain addresses: words and separators around one "@", sometimes a stray character.
            def part(count):
                return "".join(rng.choice(words) + rng.choice(["", ".", ".", "-"]) for _ in range(count))

            email = part(rng.randint(1, 3)) + "@" + part(rng.randint(1, 4)) + rng.choice(["", "", "com", "c", "."])
            if rng.random() < 0.2:
                spot = rng.randrange(len(email) + 1)
                email = email[:spot] + rng.choice(alphabet) + email[spot:]
        fast = is_plain_email(email)
        fast_hits += fast
        accepted = django_accepts(email)
        assert not fast or accepted, email
        assert is_valid_email(email) == accepted, email
    assert fast_hits > 100  # the fast path was exercised, not only the fallback
