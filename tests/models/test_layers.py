"""Blocks against hand-computed cases."""

from __future__ import annotations

import torch

from recserve.models.layers import AUGRU, DotInteraction, masked_softmax


def test_dot_interaction_golden() -> None:
    # x = [1, 2]; tables: e1 = [3, 4], e2 = [5, 6]
    x = torch.tensor([[1.0, 2.0]])
    emb = torch.tensor([[3.0, 4.0, 5.0, 6.0]])
    out = DotInteraction(num_tables=2, dim=2)(x, emb)
    # pairs (row > col) of Z = [x, e1, e2]: (e1,x)=11, (e2,x)=17, (e2,e1)=39
    assert out.tolist() == [[1.0, 2.0, 11.0, 17.0, 39.0]]


def test_dot_interaction_width() -> None:
    inter = DotInteraction(num_tables=8, dim=32)
    assert inter.out_features == 32 + 36
    out = inter(torch.randn(5, 32), torch.randn(5, 8 * 32))
    assert out.shape == (5, 68)


def test_masked_softmax_rows_without_entries() -> None:
    scores = torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    w = masked_softmax(scores, mask)
    torch.testing.assert_close(w[0, :2], torch.softmax(torch.tensor([1.0, 2.0]), 0))
    assert w[0, 2] == 0 and torch.equal(w[1], torch.zeros(3))


def test_augru_zero_attention_keeps_state_and_matches_gru_cell_at_one() -> None:
    torch.manual_seed(0)
    cell = AUGRU(4, 3)
    x = torch.randn(2, 5, 4)
    mask = torch.ones(2, 5, dtype=torch.bool)
    assert torch.equal(cell(x, torch.zeros(2, 5), mask), torch.zeros(2, 3))
    # With attention 1 everywhere the AUGRU is a plain GRU (PyTorch's gate layout r, z, n
    # has z as "keep" where ours is "update": u = 1 - z).
    gru = torch.nn.GRUCell(4, 3)
    with torch.no_grad():
        wx, wh = cell.x2h.weight.clone(), cell.h2h.weight.clone()
        bx, bh = cell.x2h.bias.clone(), cell.h2h.bias.clone()
        gru.weight_ih.copy_(torch.cat([wx[:3], -wx[3:6], wx[6:]]))
        gru.weight_hh.copy_(torch.cat([wh[:3], -wh[3:6], wh[6:]]))
        gru.bias_ih.copy_(torch.cat([bx[:3], -bx[3:6], bx[6:]]))
        gru.bias_hh.copy_(torch.cat([bh[:3], -bh[3:6], bh[6:]]))
    h = torch.zeros(2, 3)
    for t in range(5):
        h = gru(x[:, t], h)
    torch.testing.assert_close(cell(x, torch.ones(2, 5), mask), h, rtol=1e-5, atol=1e-6)
