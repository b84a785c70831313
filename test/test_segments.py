"""segments.run_start against the definition it replaces (a cummax of the run-start positions)."""
import pytest
import torch

from cmfiou_core.segments import run_start


@pytest.mark.parametrize("n,p", [(1, 0.5), (2, 0.0), (7, 1.0), (1000, 0.01), (5000, 0.3), (4096, 0.9)])
def test_run_start_equals_cummax_of_start_positions(n, p):
    g = torch.Generator().manual_seed(n)
    is_start = torch.rand(n, generator=g) < p
    is_start[0] = True
    pos = torch.arange(n)
    ref = torch.cummax(torch.where(is_start, pos, torch.zeros_like(pos)), 0).values
    got = run_start(is_start)
    assert got.dtype == torch.int64 and torch.equal(got, ref)


def test_run_start_of_sorted_keys():
    keys = torch.tensor([3, 3, 3, 5, 8, 8, 9, 9, 9, 9])
    is_start = torch.ones(10, dtype=torch.bool)
    is_start[1:] = keys[1:] != keys[:-1]
    assert run_start(is_start).tolist() == [0, 0, 0, 3, 4, 4, 6, 6, 6, 6]
