"""Label-map functions of the generator: nesting checks, RoPE ids (against the official ids), balanced splits."""

import pytest
import torch

import nvg  # noqa: F401
from nvg.structure import check_nested, rope_ids_content, rope_ids_structure, split_clusters


@pytest.fixture(scope="module")
def ref(nvg_reference):
    return nvg_reference


def test_rope_ids_match_official(ref):
    labels = ref["quant.labels"]
    for i in range(9):
        ids = rope_ids_content(labels[:, i], i, 8, (16, 16))
        assert torch.equal(ids, ref["rope.content_ids"][:, i].long()), f"content ids, stage {i}"
        if i < 8:
            assert torch.equal(rope_ids_structure(ids), ref["rope.structure_ids"][:, i].long()), f"structure ids {i}"


def test_check_nested_accepts_official_maps(ref):
    check_nested(ref["quant.labels"])


def _random_nested(B, K, gen):
    N = 2**K
    maps = [torch.zeros(B, N, dtype=torch.long)]
    for i in range(K):
        maps.append(split_clusters(maps[-1], torch.randn(B, N, generator=gen), i))
    return torch.stack(maps, 1)


@pytest.mark.parametrize("gumbel", [False, True])
def test_split_keeps_equal_nested_halves(gumbel):
    gen = torch.Generator().manual_seed(0)
    labels = torch.zeros(3, 64, dtype=torch.long)
    maps = [labels]
    for i in range(6):
        maps.append(split_clusters(maps[-1], torch.randn(3, 64, generator=gen), i, gumbel=gumbel, generator=gen))
    check_nested(torch.stack(maps, 1))


def test_split_picks_top_half_per_parent():
    labels = torch.tensor([[0, 1, 0, 1, 0, 1, 0, 1]])
    values = torch.tensor([[0.9, -0.5, -0.2, 0.8, 0.5, 0.1, -0.9, -0.3]])
    nxt = split_clusters(labels, values, 1)
    # parent 0 = positions 0,2,4,6 -> top two (0, 4) become child 1; parent 1 = 1,3,5,7 -> (3, 5) become child 3
    assert nxt.tolist() == [[1, 2, 0, 3, 1, 3, 0, 2]]


def test_split_matches_official_topk(ref):
    # misc.cluster_topk: gumbel_topk(v, 4, random=False) on (2, 4, 8) blocks = one stage-2 split of 32 positions
    v = ref["misc.cluster_topk.values"]
    B, n, E = v.shape
    labels = torch.arange(n).repeat_interleave(E).repeat(B, 1)
    nxt = split_clusters(labels, v.reshape(B, n * E), 2)
    assert torch.equal(nxt.view(B, n, E) % 2, ref["misc.cluster_topk.k4"])


@pytest.mark.parametrize("case", ["range", "size", "nesting", "shape"])
def test_check_nested_errors(case):
    maps = _random_nested(2, 4, torch.Generator().manual_seed(1))
    if case == "range":
        maps[0, 2, 0] = 7
        match = "outside"
    elif case == "size":
        maps[0, 1] = 0
        maps[0, 1, :9] = 1
        match = "not equal-sized"
    elif case == "nesting":
        maps[1, 3] = maps[1, 3].flip(-1)
        match = "not nested|not equal-sized"
    else:
        maps = maps[0]
        match = r"\(B, stages, N\)"
    with pytest.raises(ValueError, match=match):
        check_nested(maps)
