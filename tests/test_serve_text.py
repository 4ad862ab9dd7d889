"""Stop strings over streamed text, against the full text cut at the first stop string."""

import random

from hexjax.serve.text import TextStream

# byte pieces: ASCII, and the halves of two-byte and the thirds of three-byte UTF-8 characters
PIECES = [b"a", b"b", b"ab", b" ", b"ba ", b"\xc3", b"\xa9", "é".encode(), b"\xe2\x82", b"\xac", "€".encode()]


def _decode(ids):
    return b"".join(PIECES[i] for i in ids).decode("utf-8", errors="replace")


def test_stream_matches_reference_cut():
    rng = random.Random(0)
    stopped_cases = 0
    for case in range(400):
        ids = [rng.randrange(len(PIECES)) for _ in range(rng.randint(1, 30))]
        stops = [_decode([rng.randrange(len(PIECES)) for _ in range(rng.randint(1, 3))]).replace("\ufffd", "")
                 for _ in range(rng.randint(0, 3))]
        stops = [s for s in stops if s]
        # reference: decode everything, cut at the earliest occurrence of any stop string
        full = _decode(ids)
        hits = [full.find(s) for s in stops if full.find(s) >= 0]
        want = full[:min(hits)] if hits else full
        ts = TextStream(_decode, stops)
        got, stopped = [], False
        for n in range(1, len(ids) + 1):
            stopped = ts.update(ids[:n])
            got.append(ts.take(final=stopped or n == len(ids)))
            sent = "".join(got)
            assert want.startswith(sent), (case, ids, stops, sent, want)   # never takes anything back
            assert not any(s in sent for s in stops)
            if stopped:
                break
        assert "".join(got) == want, (case, ids, stops)
        assert stopped == bool(hits)
        stopped_cases += stopped
    assert stopped_cases > 100   # the stop path is exercised, not only the no-stop one


def test_hold_back_releases_when_no_longer_a_prefix():
    ts = TextStream(lambda ids: "".join("xy z"[i] for i in ids), ["yy"])
    ts.update([0, 1])              # "xy": the y may start "yy"
    assert ts.take(False) == "x"
    ts.update([0, 1, 3])           # "xyz": it did not
    assert ts.take(False) == "yz"
    assert not ts.stopped
