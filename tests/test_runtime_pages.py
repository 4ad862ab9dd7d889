"""Page allocator: growth, freeing, block tables, exhaustion."""

import numpy as np
import pytest

from hexjax.runtime.pages import PageAllocator, PagesExhaustedError, pages_for


def test_pages_for():
    assert [pages_for(n, 4) for n in (1, 3, 4, 5, 8, 9)] == [1, 1, 1, 2, 2, 3]


def test_grow_free_and_block_table():
    a = PageAllocator(num_pages=8, page_size=4)
    assert a.num_free() == 7  # page 0 is reserved
    a.grow("x", 5)
    a.grow("y", 1)
    assert len(a.pages("x")) == 2 and len(a.pages("y")) == 1
    a.grow("x", 8)               # still two pages
    assert len(a.pages("x")) == 2
    a.grow("x", 9)
    assert len(a.pages("x")) == 3 and a.num_free() == 3
    owned = a.pages("x") + a.pages("y")
    assert len(set(owned)) == 4 and 0 not in owned
    table = a.block_table(["x", None, "y"], width=4)
    assert table.dtype == np.int32 and table.shape == (3, 4)
    assert table[0, :3].tolist() == a.pages("x") and table[0, 3] == 0
    assert table[1].tolist() == [0, 0, 0, 0]
    assert table[2, 0] == a.pages("y")[0] and table[2, 1:].tolist() == [0, 0, 0]
    a.free("x")
    assert a.num_free() == 6 and a.pages("x") == []
    with pytest.raises(KeyError):
        a.free("x")


def test_exhaustion_says_needed_and_free_and_is_all_or_nothing():
    a = PageAllocator(num_pages=5, page_size=16)   # 4 usable pages
    a.grow(0, 40)                                  # 3 pages
    with pytest.raises(PagesExhaustedError, match=r"2 more pages of 16 tokens were needed but only 1 of 4 are free"):
        a.reserve({1: (16, 0), 2: (1, 0)})
    # nothing was taken by the failed request
    assert a.num_free() == 1 and a.pages(1) == [] and a.pages(2) == []
    a.reserve({1: (16, 0)})
    assert a.num_free() == 0


def test_shards_keep_to_their_range():
    a = PageAllocator(num_pages=8, page_size=2, num_shards=2)
    a.grow("a", 6, shard=0)
    a.grow("b", 6, shard=1)
    assert all(1 <= p < 4 for p in a.pages("a"))
    assert all(5 <= p < 8 for p in a.pages("b"))
    assert a.block_table([None, None], 2, shards=[0, 1]).tolist() == [[0, 0], [4, 4]]
    with pytest.raises(PagesExhaustedError, match="range 1"):
        a.grow("c", 1, shard=1)
    with pytest.raises(ValueError, match="already holds pages in range 0"):
        a.grow("a", 8, shard=1)


def test_bad_sizes():
    with pytest.raises(ValueError, match="multiple of num_shards"):
        PageAllocator(num_pages=7, page_size=4, num_shards=2)
    with pytest.raises(ValueError, match="at least 2 pages"):
        PageAllocator(num_pages=1, page_size=4)


@pytest.mark.parametrize("dps", [[1], [3], [2, 3], [3, 2], [4, 2, 1], [3, 4], [4, 3, 2]])
def test_rows_spread_requests_evenly_over_every_stage_groups(dps):
    # stages of different dp pad a microbatch to a multiple of all of them; the requests are then
    # spread so that each stage's groups hold at most ceil(requests / dp), as the cost model assumes
    import math

    from hexjax.runtime.build import assign_rows, group_pages, plan_layout
    for n in range(1, 30):
        for micro in (1, 2, 3):
            lay = plan_layout(n, [5] * n, 3, len(dps), dps, 16, micro)
            rows = assign_rows(n, lay, dps)
            assert sorted(r for row in rows for r in row if r is not None) == list(range(n))
            for dp in dps:
                per = lay.micro_batch // dp
                for row in rows:
                    real = sum(r is not None for r in row)
                    groups = [sum(r is not None for r in row[g * per:(g + 1) * per]) for g in range(dp)]
                    assert max(groups) <= math.ceil(real / dp), (n, micro, dp, row)
                # one page per request (5 + 3 tokens), plus the reserved page of each group
                assert sum(group_pages(rows, [5] * n, 3, dp, 16)) == n + dp
