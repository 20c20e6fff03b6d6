"""tools/smollm2.py's window builder, on token lists (no model, no tokenizer needed)."""

import numpy as np
import pytest
from tools.smollm2 import token_windows


def test_windows_are_full_slices_of_one_file():
    files = [list(range(1000, 1000 + 50)), list(range(2000, 2000 + 20)), list(range(3000, 3000 + 7))]
    data = token_windows(files, seq=8, start=0)
    ids = data["input_ids"]
    # 50 tokens -> 7 windows of 7 (one token dropped), 20 -> 2 (6 dropped), 7 -> 1
    assert ids.shape == (10, 8) and ids.dtype == np.int64
    assert (data["attention_mask"] == 1).all() and data["attention_mask"].dtype == np.int64
    assert (ids[:, 0] == 0).all()
    body = ids[:, 1:]
    assert (np.diff(body, axis=1) == 1).all()  # consecutive tokens of one file
    assert ((body[:, 0] % 1000) % 7 == 0).all()  # windows start at multiples of seq - 1 within their file
    assert len({tuple(r) for r in body}) == len(body)
    assert not np.isin(np.arange(1049, 1050), body).any()  # the short tail is dropped


def test_smaller_count_is_a_prefix_and_seed_changes_order():
    files = [list(range(k * 1000, k * 1000 + 300)) for k in range(1, 4)]
    many = token_windows(files, seq=16, count=30, seed=0)["input_ids"]
    few = token_windows(files, seq=16, count=10, seed=0)["input_ids"]
    assert (many[:10] == few).all()
    every = token_windows(files, seq=16, seed=0)["input_ids"]
    other = token_windows(files, seq=16, seed=1)["input_ids"]
    assert len(every) == 3 * (300 // 15) and (every[:30] == many).all()
    assert not (other == every).all()
    assert sorted(map(tuple, other)) == sorted(map(tuple, every))  # the same windows, another order


def test_too_little_text_is_an_error():
    with pytest.raises(ValueError, match="holds 1"):
        token_windows([list(range(10))], seq=8, count=2)
    with pytest.raises(ValueError, match="no text"):
        token_windows([list(range(3))], seq=8)
