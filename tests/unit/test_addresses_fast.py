"""The regular-expression fast path of parse_addresses agrees with the full parser."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from submitd.message import addresses as A

ALPHABET = 'ab.-_+@<> \t"()\\,;:[]é1'


def full(text: str) -> list[A.Mailbox] | None:
    try:
        mailboxes, _count, _groups = A._Parser(text, False).address_list(groups=True)
    except A.AddressError:
        return None
    return list(mailboxes)


@settings(max_examples=3000, deadline=None)
@given(st.text(alphabet=ALPHABET, max_size=30))
def test_fast_path_matches_the_parser(text: str) -> None:
    fast = A._simple_mailbox(text)
    if fast is not None:
        assert full(text) == [fast]


@given(
    st.from_regex(r"[a-z]{1,5}(\.[a-z]{1,5}){0,2}", fullmatch=True),
    st.from_regex(r"[a-z]{1,5}(\.[a-z]{1,5}){1,2}", fullmatch=True),
    st.sampled_from(["", "Alice ", "Alice Smith ", " ", "Bob\t"]),
    st.booleans(),
)
def test_common_shapes_take_the_fast_path(local: str, domain: str, name: str, angled: bool) -> None:
    address = f"{local}@{domain}"
    text = f"{name}<{address}>" if angled or name.strip() else address
    fast = A._simple_mailbox(text)
    assert fast is not None and fast.address == address
    assert full(text) == [fast]


@settings(max_examples=2000, deadline=None)
@given(st.text(alphabet="Sat, 28 Nov 2026 19:30:00 +0000\t()\r\n\\", max_size=40))
def test_remove_comments_fast_path_matches_the_walk(text: str) -> None:
    try:
        walked = A._remove_comments_walk(text)
    except A.AddressError:
        return  # only texts with comments or folds can be refused; they take the walk
    assert A.remove_comments(text) == walked
