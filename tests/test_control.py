"""Control: structure-guided generation, structure transfer, stage-wise regeneration, clear errors on bad maps."""

import pytest
import torch

import nvg  # noqa: F401
from nvg.sample import control
from nvg.model import GeneratorConfig, NVGGenerator
from nvg.sample import SampleConfig, Sampler
from nvg.structure import check_nested, split_clusters
from nvg.tokenizer import Tokenizer, TokenizerConfig

SC = SampleConfig(structure_steps=2)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    cfg = GeneratorConfig.from_name("nvg-test")
    model = NVGGenerator(cfg).eval()
    tok = Tokenizer(TokenizerConfig(image_size=16, latent_size=4, base_channels=8, channel_mult=(1, 1, 1),
                                    num_res_blocks=1, latent_channels=cfg.latent_dim, codebook_size=cfg.vocab_size,
                                    norm_groups=4)).eval()
    tok.quantize.embedding.weight.data.normal_()
    return Sampler(model, tok), tok


def _maps(B, stages, N=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    maps = [torch.zeros(B, N, dtype=torch.long)]
    for i in range(stages - 1):
        maps.append(split_clusters(maps[-1], torch.randn(B, N, generator=g), i))
    return torch.stack(maps, 1)


def test_structure_guided_follows_user_maps(setup):
    sampler, _ = setup
    maps = _maps(1, 3).view(1, 3, 4, 4)  # (B, S', h, w) grids
    vgs = control.structure_guided(sampler, torch.tensor([1, 2, 3]), maps, SC, seed=0)
    assert torch.equal(vgs.labels[:, :3], maps.flatten(-2).expand(3, -1, -1))
    check_nested(vgs.labels)


def test_mask_to_structure_gives_equal_halves():
    mask = torch.zeros(32, 32)
    mask[8:24, 4:20] = 1.0  # a rectangle over 6 of the 16 latent cells: the split still has 8 + 8 positions
    maps = control.mask_to_structure(mask, (4, 4))
    check_nested(maps)
    covered = torch.nn.functional.interpolate(mask[None, None], size=(4, 4), mode="area")[0, 0] > 0
    assert maps[0, 1].view(4, 4)[covered].eq(1).all()


def test_structure_transfer_uses_reference_maps(setup):
    sampler, tok = setup
    imgs = torch.rand(2, 3, 16, 16) * 2 - 1
    ref = tok.encode(imgs)
    vgs = control.structure_transfer(sampler, imgs, torch.tensor([5, 6]), stages=3, sc=SC, seed=1)
    assert torch.equal(vgs.labels[:, :3], ref.labels[:, :3])
    check_nested(vgs.labels)


def test_regenerate_keeps_the_first_stages(setup):
    sampler, tok = setup
    imgs = torch.rand(2, 3, 16, 16) * 2 - 1
    ref = tok.encode(imgs)
    vgs = control.regenerate(sampler, imgs, keep_stages=2, classes=torch.tensor([7, 8]), sc=SC, seed=2)
    for i in range(2):
        assert torch.equal(vgs.tokens[i], ref.tokens[i]) and torch.equal(vgs.labels[:, i], ref.labels[:, i])
    torch.testing.assert_close(vgs.canvas[:, :3], ref.canvas[:, :3], atol=1e-5, rtol=1e-5)
    only = control.regenerate(sampler, imgs, 3, torch.tensor([7, 8]), keep_structure_only=True, sc=SC, seed=2)
    assert torch.equal(only.labels[:, :3], ref.labels[:, :3])


def test_reference_images_are_checked(setup):
    """The tokenizer is the sampler's; a call that still passes one (the older signature) or images of another shape
    gets an error naming the problem."""
    sampler, tok = setup
    imgs = torch.rand(2, 3, 16, 16) * 2 - 1
    with pytest.raises(ValueError, match="reference images must be a tensor .* got Tokenizer .* no tokenizer argument"):
        control.structure_transfer(sampler, tok, imgs, torch.tensor([5, 6]))
    with pytest.raises(ValueError, match=r"reference images must be a tensor \(B, 3, H, W\), got \(3, 16, 16\)"):
        control.regenerate(sampler, imgs[0], 2, torch.tensor([7]))


@pytest.mark.parametrize("fault,match", [
    ("not_nested", "not nested|not equal-sized"), ("unequal", "not equal-sized"), ("size", "latent grid"),
    ("range", "outside"),
])
def test_bad_maps_raise(setup, fault, match):
    sampler, _ = setup
    maps = _maps(1, 3)
    if fault == "not_nested":
        maps[0, 2] = maps[0, 2].roll(1)
    elif fault == "unequal":
        maps[0, 1] = 0
        maps[0, 1, :6] = 1
    elif fault == "range":
        maps[0, 2, 0] = 9
    else:
        maps = torch.zeros(1, 2, 5, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=match):
        control.structure_guided(sampler, torch.tensor([1]), maps, SC, seed=0)


def test_fixed_tokens_need_their_maps(setup):
    sampler, _ = setup
    with pytest.raises(ValueError, match="label maps"):
        sampler.generate(torch.tensor([1]), SC, seed=0, tokens=[torch.zeros(1, 1, dtype=torch.long)])
    with pytest.raises(ValueError, match="need at least as many"):
        sampler.generate(torch.tensor([1]), SC, seed=0, structure=_maps(1, 1),
                         tokens=[torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long)])
