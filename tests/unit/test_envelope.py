"""The envelope's hand-written JSON form against the dataclass it mirrors."""

from __future__ import annotations

import dataclasses
import json

from submitd.envelope import Envelope, Recipient


def test_to_json_has_every_field_and_round_trips() -> None:
    envelope = Envelope(
        sender="a@example.org",
        recipients=[Recipient("b@example.net", ("SUCCESS", "DELAY"), "rfc822;b@example.net")],
        body="8BITMIME",
        smtputf8=True,
        size=1234,
        ret="HDRS",
        envid="id+1",
        auth="<>",
    )
    data = envelope.to_json()
    # A field added to the dataclass but not to to_json would be lost in the queue.
    assert data == json.loads(json.dumps(dataclasses.asdict(envelope)))
    assert Envelope.from_json(json.loads(json.dumps(data))) == envelope


def test_null_sender_and_plain_recipient() -> None:
    envelope = Envelope(sender="", recipients=[Recipient("b@example.net")])
    assert Envelope.from_json(json.loads(json.dumps(envelope.to_json()))) == envelope
