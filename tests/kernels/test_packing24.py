"""2:4 validation and the two compact layouts (kernel values+meta, on-disk bitmask)."""
import numpy as np
import pytest
import torch

from tensorpress.packing import (bitmask_to_meta, check_24, meta_to_bitmask, pack_24, pack_24_bitmask, pack_bits,
                                 unpack_24, unpack_24_bitmask, unpack_bits)


def sparse_weight(n, k, seed=0, fewer=0.2):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k // 4, 4, generator=g)
    keep = torch.rand(n, k // 4, 4, generator=g).argsort(-1)[..., :2]
    mask = torch.zeros_like(w, dtype=torch.bool).scatter_(-1, keep, True)
    drop = torch.rand(n, k // 4, 4, generator=g) < fewer          # some groups keep 0 or 1
    return (w * (mask & ~drop)).reshape(n, k)


@pytest.mark.parametrize("n,k", [(5, 36), (16, 64), (3, 4), (7, 100)])
def test_pack_roundtrip(n, k):
    w = sparse_weight(n, k, seed=n * k)
    values, meta = pack_24(w)
    assert values.shape == (n, k // 2) and meta.shape == (n, -(-k // 32)) and meta.dtype == torch.int32
    assert torch.equal(unpack_24(values, meta, k), w)
    # values are the kept entries in input order: every non-zero of w appears, in order
    assert torch.equal(values[values != 0], w[w != 0])


def test_meta_is_two_bit_lsb_first():
    w = torch.zeros(1, 8)
    w[0, [1, 3, 4, 6]] = torch.tensor([1.0, 2.0, 3.0, 4.0])        # group 0 keeps {1, 3}, group 1 {0, 2}
    values, meta = pack_24(w)
    assert values.tolist() == [[1.0, 2.0, 3.0, 4.0]]
    assert meta.tolist() == [[1 | 3 << 2 | 0 << 4 | 2 << 6]]
    assert unpack_bits(meta, 2, 4, dim=1).tolist() == [[1, 3, 0, 2]]


def test_underfull_groups_keep_lowest_free_positions():
    w = torch.zeros(1, 8)
    w[0, 2] = 5.0                                                   # group 0: one non-zero; group 1: none
    values, meta = pack_24(w)
    assert unpack_bits(meta, 2, 4, dim=1).tolist() == [[0, 2, 0, 1]]
    assert values.tolist() == [[0.0, 5.0, 0.0, 0.0]]


def test_check_names_first_offending_row_and_group():
    w = sparse_weight(6, 40)
    check_24(w)
    bad = w.clone()
    bad[4, 8:12] = torch.tensor([1.0, 2.0, 3.0, 0.0])               # row 4, group 2: 3 non-zeros
    bad[5, 0:4] = 1.0                                               # a later one must not be reported
    with pytest.raises(ValueError, match=r"row 4, group 2 \(inputs 8\.\.11\) has 3 non-zeros"):
        check_24(bad)
    with pytest.raises(ValueError, match="row 4, group 2"):
        pack_24(bad)
    with pytest.raises(ValueError, match="divisible by 4"):
        check_24(torch.zeros(2, 6))


def test_bitmask_matches_numpy_packbits_little():
    w = sparse_weight(9, 52, seed=3)
    compressed, bitmask = pack_24_bitmask(w)
    values, meta = pack_24(w)
    assert torch.equal(compressed, values)
    keep = unpack_24(torch.ones_like(values), meta, 52) != 0      # kept positions (incl. explicit zeros)
    expect = np.packbits(keep.numpy(), axis=-1, bitorder="little")
    assert bitmask.dtype == torch.uint8 and bitmask.shape == (9, 7)
    assert np.array_equal(bitmask.numpy(), expect)
    assert torch.equal(bitmask_to_meta(bitmask, 52), meta)
    assert torch.equal(meta_to_bitmask(meta, 52), bitmask)
    assert torch.equal(unpack_24_bitmask(compressed, bitmask, 52), w)


def test_bitmask_rejects_groups_without_exactly_two():
    bitmask = torch.tensor([[0b00110111]], dtype=torch.uint8)      # group 0 keeps 3, group 1 keeps 2
    with pytest.raises(ValueError, match="row 0, group 0 keeps 3"):
        bitmask_to_meta(bitmask, 8)


def test_corrupt_meta_rejected():
    meta = pack_bits(torch.tensor([[2, 1, 0, 1]], dtype=torch.int32), 2, dim=1)   # group 0 not increasing
    with pytest.raises(ValueError, match="row 0, group 0"):
        unpack_24(torch.ones(1, 4), meta, 8)


def test_existing_pack_bits_unchanged():
    codes = torch.randint(0, 16, (19, 5), dtype=torch.int32)
    packed = pack_bits(codes, 4, dim=0)
    assert packed.shape == (3, 5)
    assert torch.equal(unpack_bits(packed, 4, 19, dim=0), codes)
    assert int(packed[0, 0]) & 0xF == int(codes[0, 0])              # GPTQ: element 0 in the low nibble
