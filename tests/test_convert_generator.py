"""Official-layout generator checkpoints load strictly and reproduce the official outputs."""

import pytest
import torch

import nvg  # noqa: F401
from nvg.convert_generator import load_official_generator


@pytest.fixture(scope="module")
def ref(nvg_reference):
    return nvg_reference


def test_full_checkpoint_layout_loads_and_matches(ref):
    sd = ref["gen_d2.state_dict"]
    ckpt = {"state_dict": {**{f"nvgformer.{k}": v for k, v in sd.items()},
                           **{f"ema_model.nvgformer.{k}": v * 0 for k, v in sd.items() if v.is_floating_point()},
                           "first_stage_model.encoder.conv_in.weight": torch.zeros(1)}}
    model = load_official_generator(ckpt)
    assert model.config.depth == 2 and model.config.width == 128 and model.config.num_classes == 1000
    with torch.no_grad():
        out = model(ref["quant.canvas"][:2], ref["quant.labels"][:2], ref["gen_d2.train.txt"][:, 0],
                    eps_BNK=ref["gen_d2.train.eps0"][:, 0], t_BS=ref["gen_d2.train.t"])
    torch.testing.assert_close(out["x0_hat"], ref["gen_d2.train.x0_hat"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["struct_v"], ref["gen_d2.train.struct_v"], atol=1e-4, rtol=1e-4)


def test_ema_selection(ref):
    sd = ref["gen_d2.state_dict"]
    ckpt = {"state_dict": {**{f"nvgformer.{k}": v for k, v in sd.items()},
                           **{f"ema_model.nvgformer.{k}": v + 1 if k.endswith("bias") else v for k, v in sd.items()}}}
    model = load_official_generator(ckpt, ema=True)
    torch.testing.assert_close(model.cls_head.linear.bias, sd["cls_head.linear.bias"] + 1)


@pytest.mark.parametrize("fault", ["missing", "unexpected", "shape"])
def test_bad_state_dicts_name_the_key(ref, fault):
    sd = dict(ref["gen_d2.state_dict"])
    if fault == "missing":
        sd.pop("structure_head.linear.bias")
        key = "structure_head.linear.bias"
    elif fault == "unexpected":
        sd["content_blocks.0.extra"] = torch.zeros(1)
        key = "content_blocks.0.extra"
    else:
        sd["x0_head.linear.bias"] = torch.zeros(5)
        key = "x0_head.linear.bias"
    with pytest.raises((KeyError, ValueError), match=key.replace(".", r"\.")):
        load_official_generator(sd)


def test_official_d16_key_list_matches_layout(reference_dir):
    keys = reference_dir / "official_keys_generator_d16.txt"
    from nvg.model import GeneratorConfig, NVGGenerator

    official = {}
    for line in open(keys):
        if line.startswith("#") or not line.strip():
            continue
        key, shape = line.split("\t")[:2]
        official[key] = tuple(int(x) for x in shape.strip("()").split(",") if x.strip())
    with torch.device("meta"):
        model = NVGGenerator(GeneratorConfig.from_name("nvg-d16", repa_dim=768))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == official
