"""Fuzz target: MAIL/RCPT arguments (`submitd.smtp.syntax`).

Input layout: byte 0 is a flag set (bit 0: SMTPUTF8; bit 1: decode the rest with
surrogateescape rather than as strict UTF-8, which the session does; bits 2-3: the SIZE
limit), the rest is the text after the verb. The same text goes through every entry
point: split_argument (FROM and TO), both path parsers, parse_params with the MAIL and RCPT
interpreters, decode_xtext, and the MAIL/RCPT pipeline the session runs.

Invariants: only SyntaxProblem escapes (ValueError from decode_xtext, as documented); its
reply encodes and has no CR or LF inside a line; an accepted mailbox round-trips through
str() (``<str(mailbox)>`` parses to the same mailbox); both path parsers agree; xtext
round-trips through a reference encoder.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["submitd"]):
    from _common import Violation, check

    from submitd.smtp.syntax import (
        Mailbox,
        SyntaxProblem,
        decode_xtext,
        parse_forward_path,
        parse_mail_params,
        parse_params,
        parse_rcpt_params,
        parse_reverse_path,
        split_argument,
    )

UTF8 = 0x01
SURROGATES = 0x02
_LIMITS = (0, 100, 50 * 1024 * 1024, 10**30)


def check_problem(problem: SyntaxProblem) -> None:
    encoded = problem.reply.encode()  # must not raise (e.g. on a lone surrogate)
    lines = encoded.split(b"\r\n")
    check(lines[-1] == b"" and len(lines) == len(problem.reply.lines) + 1, f"{encoded!r}")
    check(400 <= problem.reply.code <= 599, f"refusal with code {problem.reply.code}")


def encode_xtext(text: str) -> str:
    """RFC 3461 4: xchar as is, everything else (and "+", "=") as "+XX"."""
    return "".join(
        chr(octet) if 33 <= octet <= 126 and octet not in b"+=" else f"+{octet:02X}"
        for octet in text.encode("utf-8")
    )


def round_trip(mailbox: Mailbox | None, path: str, utf8: bool, reverse: bool) -> None:
    if mailbox is None:
        check(path == "<>", f"null path from {path!r}")
        return
    again: Mailbox | None
    text = f"<{mailbox}>"
    try:
        if reverse:
            again = parse_reverse_path(text, utf8=utf8)
        else:
            again = parse_forward_path(text, utf8=utf8)
    except SyntaxProblem as problem:
        raise Violation(f"{path!r} gave {mailbox!r}, but {text!r} is refused") from problem
    check(again == mailbox, f"{path!r} gave {mailbox!r}, {text!r} gives {again!r}")


def try_paths(path: str, utf8: bool) -> None:
    results: list[Mailbox | None] = []
    for reverse in (True, False):
        try:
            if reverse:
                mailbox: Mailbox | None = parse_reverse_path(path, utf8=utf8)
            else:
                mailbox = parse_forward_path(path, utf8=utf8)
        except SyntaxProblem as problem:
            check_problem(problem)
            continue
        round_trip(mailbox, path, utf8, reverse)
        results.append(mailbox)
    special = path == "<>" or path.lower() == "<postmaster>"
    if len(results) == 2 and not special:
        check(results[0] == results[1], f"reverse and forward disagree on {path!r}")


def try_params(text: str, max_size: int) -> None:
    try:
        params = parse_params(text)
    except SyntaxProblem as problem:
        check_problem(problem)
        return
    check(all(name == name.upper() for name in params), f"keywords not uppercased: {params}")
    try:
        parse_mail_params(params, max_size=max_size)
    except SyntaxProblem as problem:
        check_problem(problem)
    try:
        parse_rcpt_params(params)
    except SyntaxProblem as problem:
        check_problem(problem)


def try_xtext(text: str) -> None:
    try:
        decoded = decode_xtext(text)
    except ValueError:
        return
    check(decode_xtext(encode_xtext(decoded)) == decoded, f"xtext round trip of {text!r}")


def try_command(arg: str, keyword: str, utf8: bool, max_size: int) -> None:
    """What Session._mail / _rcpt do with the argument."""
    try:
        path, param_text = split_argument(arg, keyword)
    except SyntaxProblem as problem:
        check_problem(problem)
        return
    check(path.startswith("<") and path.endswith(">"), f"split gave path {path!r}")
    check(param_text == param_text.strip(" "), f"split gave params {param_text!r}")
    try:
        params = parse_params(param_text)
        if keyword == "FROM":
            utf8 = parse_mail_params(params, max_size=max_size).smtputf8
            mailbox = parse_reverse_path(path, utf8=utf8)
            check(mailbox is None or str(mailbox) != "", "empty sender from a non-null path")
        else:
            parse_rcpt_params(params)
            parse_forward_path(path, utf8=utf8)
    except SyntaxProblem as problem:
        check_problem(problem)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    flags = data[0]
    utf8 = bool(flags & UTF8)
    max_size = _LIMITS[(flags >> 2) & 3]
    try:
        text = data[1:].decode("utf-8", "surrogateescape" if flags & SURROGATES else "strict")
    except UnicodeDecodeError:
        return
    for keyword in ("FROM", "TO"):
        try_command(text, keyword, utf8, max_size)
    try:
        split_argument(text, "BOGUS")
    except ValueError:
        pass  # documented: the keyword must be FROM or TO
    else:
        check(False, "split_argument accepted a keyword other than FROM or TO")
    try_paths(text, utf8)
    try_params(text, max_size)
    try_xtext(text)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
