"""The incremental SSE parser yields the same events however the bytes are split."""

from aibridge_gw.flow.sse import SSEParser

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


def test_a_line_over_the_limit_is_skipped_with_its_event_and_parsing_resumes_with_the_next():
    """A data line over MAX_PENDING is not buffered: its event is dropped, the events after it (the final usage)
    still come, however the bytes are split; memory stays bounded by the limit."""
    from aibridge_gw.flow import sse

    limit = 1024
    huge = b"event: big\ndata: " + b"x" * (3 * limit) + b"\ndata: more\n\n"
    stream = b"data: before\n\n" + huge + b"event: usage\ndata: {\"n\":1}\r\n\r\ndata: tail\n\n"
    expected = [("message", "before", None), ("usage", '{"n":1}', None), ("message", "tail", None)]
    original = sse.MAX_PENDING
    sse.MAX_PENDING = limit
    try:
        assert _events([stream]) == expected
        for step in (1, 7, 100, limit - 1, limit + 1, 5000):
            p = SSEParser()
            out = []
            for i in range(0, len(stream), step):
                out += p.feed(stream[i:i + step])
                assert len(p._buf) <= limit + step
            out += p.feed(b"")
            assert [(e.event, e.data, e.id) for e in out] == expected, step
            assert p.skipped == 1
        # the long line ends with a CR split from its LF across chunks
        cr = b"data: " + b"y" * (2 * limit) + b"\r"
        assert _events([cr, b"\n\ndata: after\n\n"]) == [("message", "after", None)]
    finally:
        sse.MAX_PENDING = original

