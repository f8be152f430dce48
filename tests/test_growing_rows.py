"""GrowingRows (editors/common.py): the one growable row storage of the editors (GRACE, T-Patcher,
LEMoE, WISE; held by LiveEdit's expert repository and RECIPE/LTE's memory)."""
import pytest
import torch

from editors.common import GrowingRows
from utils.errors import UserError

SHAPES = {"key": (3,), "pair": (2, 2), "scalar": ()}


def rows(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn((n,) + s, generator=g) for k, s in SHAPES.items()}


def test_doubling_keeps_contents_and_reallocates_only_when_full():
    store = GrowingRows(SHAPES, initial_capacity=2)
    expected, caps = [], []
    for i in range(37):
        one = {k: t[0] for k, t in rows(1, i).items()}
        before = store.view("pair").untyped_storage().data_ptr(), store.capacity
        assert store.append(**one) == i
        if store.capacity == before[1]:
            assert store.view("pair").untyped_storage().data_ptr() == before[0]
        caps.append(store.capacity)
        expected.append(one)
    assert sorted(set(caps)) == [2, 4, 8, 16, 32, 64] and len(store) == 37
    for k in SHAPES:
        assert torch.equal(store.view(k), torch.stack([e[k] for e in expected]))
    store.clear()
    assert len(store) == 0 and store.capacity == 2 and store.view("key").shape == (0, 3)


def test_extend_equals_repeated_append():
    by_row, by_chunk = GrowingRows(SHAPES, initial_capacity=4), GrowingRows(SHAPES, initial_capacity=4)
    for seed, n in enumerate([1, 5, 0, 3, 20]):
        chunk = rows(n, seed)
        by_chunk.extend(chunk)
        for i in range(n):
            by_row.append(**{k: t[i] for k, t in chunk.items()})
    assert len(by_row) == len(by_chunk) == 29 and by_row.capacity == by_chunk.capacity == 32
    for k in SHAPES:
        assert torch.equal(by_row.view(k), by_chunk.view(k))


def test_append_and_extend_check_names_shapes_and_counts():
    store = GrowingRows(SHAPES)
    good = rows(2, 0)
    with pytest.raises(ValueError, match="key has shape \\(2, 4\\)"):
        store.extend({**good, "key": torch.zeros(2, 4)})
    with pytest.raises(ValueError, match="expected tensors"):
        store.extend({k: good[k] for k in ("key", "pair")})
    with pytest.raises(ValueError, match="row counts differ"):
        store.extend({**good, "scalar": torch.zeros(3)})
    with pytest.raises(ValueError, match="shape"):
        store.append(key=torch.zeros(3), pair=torch.zeros(4), scalar=torch.tensor(1.0))
    assert len(store) == 0                                     # nothing half-written
    with pytest.raises(ValueError, match="power of two"):
        GrowingRows(SHAPES, initial_capacity=12)


def test_truncate_keeps_the_first_rows_and_the_storage():
    store = GrowingRows(SHAPES, initial_capacity=4)
    store.extend(rows(6, 0))
    first = {k: store.view(k)[:2].clone() for k in SHAPES}
    cap, ptr = store.capacity, store.view("key").untyped_storage().data_ptr()
    store.truncate(2)
    assert len(store) == 2 and store.capacity == cap and store.view("key").untyped_storage().data_ptr() == ptr
    assert all(torch.equal(store.view(k), first[k]) for k in SHAPES)
    nxt = rows(1, 1)
    store.extend(nxt)
    assert torch.equal(store.view("pair")[2], nxt["pair"][0])
    with pytest.raises(ValueError, match="truncate"):
        store.truncate(4)


def test_nbytes_counts_only_filled_rows():
    store = GrowingRows(SHAPES, dtype=torch.float64, initial_capacity=16)
    assert store.row_bytes() == (3 + 4 + 1) * 8 and store.nbytes() == 0
    store.extend({k: t.double() for k, t in rows(5, 0).items()})
    assert store.nbytes() == 5 * (3 + 4 + 1) * 8 and store.capacity == 16
    store.truncate(1)
    assert store.nbytes() == (3 + 4 + 1) * 8


def test_state_and_load_round_trip_and_load_errors_name_where():
    store = GrowingRows(SHAPES, initial_capacity=2)
    store.extend(rows(5, 0))
    state = store.state()
    assert all(t.is_contiguous() and torch.equal(t, store.view(k)) for k, t in state.items())
    other = GrowingRows(SHAPES, initial_capacity=2)
    other.load(state, "somewhere")
    assert len(other) == 5 and other.capacity == 8
    assert all(torch.equal(other.view(k), store.view(k)) for k in SHAPES)
    other.load({k: t[:0] for k, t in state.items()}, "somewhere")
    assert len(other) == 0

    other.load(state, "somewhere")
    bad = [({**state, "extra": torch.zeros(5)}, "expected tensors"),
           ({k: state[k] for k in ("key", "pair")}, "expected tensors"),
           ({**state, "pair": torch.zeros(5, 4)}, "pair has shape \\(5, 4\\), expected rows of shape \\(2, 2\\)"),
           ({**state, "scalar": torch.zeros(4)}, "row counts differ")]
    for tensors, what in bad:
        with pytest.raises(UserError, match=what) as e:
            other.load(tensors, "edited state /x/y")
        message = str(e.value)
        assert message.startswith("edited state /x/y: ") and "\n" not in message
        assert len(other) == 5 and torch.equal(other.view("key"), state["key"])   # left as it was
