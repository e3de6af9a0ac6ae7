"""The incremental SSE parser yields the same events however the bytes are split."""

from aibridge_gw.sse import SSEParser

STREAM = (
    b"event: message_start\r\ndata: {\"a\":1}\r\n\r\n"
    b": keep-alive comment\n\n"
    b"event: delta\ndata: line one\ndata: line two\n\n"
    b"data: no event name\rdata: cr only\r\r"
    b"id: 7\nevent: last\ndata:{\"unspaced\":true}\n\n"
)
EXPECTED = [
    ("message_start", '{"a":1}', None),
    ("delta", "line one\nline two", None),
    ("message", "no event name\ncr only", None),
    ("last", '{"unspaced":true}', "7"),
]


def _events(chunks):
    p = SSEParser()
    out = []
    for c in chunks:
        out += p.feed(c)
    out += p.feed(b"")
    return [(e.event, e.data, e.id) for e in out]


def test_whole_stream_parses_all_events_and_line_endings():
    assert _events([STREAM]) == EXPECTED


def test_every_two_way_split_yields_the_same_events():
    for i in range(len(STREAM) + 1):
        assert _events([STREAM[:i], STREAM[i:]]) == EXPECTED, i


def test_byte_by_byte_feeding_yields_the_same_events():
    assert _events([STREAM[i : i + 1] for i in range(len(STREAM))]) == EXPECTED


def test_trailing_event_without_blank_line_is_flushed_at_end():
    assert _events([b"data: tail"]) == [("message", "tail", None)]


def test_utf8_split_inside_a_character_is_decoded_correctly():
    raw = "data: héllo ✓\n\n".encode()
    cut = raw.index("✓".encode()) + 1
    assert _events([raw[:cut], raw[cut:]]) == [("message", "héllo ✓", None)]
