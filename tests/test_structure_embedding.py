"""Bit-style structure embedding (spec §1.3) against the official `structure_int_to_feat` outputs."""


import pytest
import torch

from nvg.structure import labels_from_structure, structure_embedding


def test_matches_official(nvg_reference):
    ref = nvg_reference
    labels, feat = ref["quant.labels"], ref["struct.feat"]
    for i in range(9):
        emb = structure_embedding(labels[:, i], i, 8)
        assert emb.shape == (4, 256, 8)
        assert torch.equal(emb, feat[:, i].long()), f"stage {i}"
        assert torch.equal(labels_from_structure(emb, i), labels[:, i])


@pytest.mark.parametrize("K", [1, 3, 8])
def test_roundtrip_and_parent_prefix(K):
    for stage in range(K + 1):
        s = torch.arange(2**stage).repeat(2, 1)
        emb = structure_embedding(s, stage, K)
        assert emb.shape == (2, 2**stage, K) and emb.dtype == torch.long
        assert torch.equal(labels_from_structure(emb, stage), s)
        assert (emb[..., stage:] == 1).all()  # undecided splits sit at the midpoint
        assert torch.equal(labels_from_structure(emb.float() - 1 + 1, stage), s)  # float input works too
        if stage:
            parent = structure_embedding(s // 2, stage - 1, K)
            assert torch.equal(emb[..., : stage - 1], parent[..., : stage - 1])


def test_bad_inputs():
    with pytest.raises(ValueError, match="stage"):
        structure_embedding(torch.zeros(1, 4, dtype=torch.long), 9, 8)
    with pytest.raises(TypeError, match="integer"):
        structure_embedding(torch.zeros(1, 4), 1, 8)
    with pytest.raises(ValueError, match="stage"):
        labels_from_structure(torch.ones(1, 4, 8), -1)
