"""VAR transformer against the released code's logits (shared reference var_ref_small.pt) and the released layout."""


import pytest
import torch

from nvg.baselines.var.convert import load_var, official_var_state_dict, var_config_from_state_dict
from nvg.baselines.var.model import VAR, VARConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # small CPU workloads: see tests/conftest.py


@pytest.fixture(scope="module")
def reference(var_reference):
    return var_reference


def released_shapes(key_file, depth: int) -> dict[str, tuple[int, ...]]:
    """var_d16_keys.txt with the block keys repeated for `depth` blocks and widths scaled to 64 * depth."""
    shapes = {}
    with open(key_file) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            key, rest = line.split(" ", 1)
            shape = tuple(int(s) for s in rest.rsplit(" ", 1)[0].strip("() \n").split(",") if s.strip())
            # widths of d16: 1024 (C), 3072, 4096 (also V), 6144, 2048, 16 heads; rescale the depth-dependent ones
            scaled = []
            for i, n in enumerate(shape):
                if key.startswith("head.") and i == 0 or key == "class_emb.weight" and i == 0 or n in (680, 32, 10, 1):
                    scaled.append(n)
                elif n == 16 and "scale_mul" in key:
                    scaled.append(depth)
                else:
                    scaled.append(n // 1024 * 64 * depth if n % 1024 == 0 else n)
            shapes[key] = tuple(scaled)
    blocks = {k[len("blocks.0."):]: s for k, s in shapes.items() if k.startswith("blocks.0.")}
    shapes = {k: s for k, s in shapes.items() if not k.startswith("blocks.")}
    shapes.update({f"blocks.{i}.{k}": s for i in range(depth) for k, s in blocks.items()})
    return shapes


@pytest.mark.parametrize("depth", [16, 20, 24, 30])
def test_released_checkpoint_layout(depth, reference_dir):
    """Keys and shapes of var_d{depth}.pth, nothing more (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = VAR(VARConfig.from_name(f"var-d{depth}"))
    ours = {k: tuple(v.shape) for k, v in official_var_state_dict(model).items()}
    assert ours == released_shapes(reference_dir / "var_d16_keys.txt", depth)
    config = var_config_from_state_dict(model.state_dict())
    assert (config.depth, config.width, config.num_heads) == (depth, 64 * depth, depth)


def test_d16_parameter_count():
    with torch.device("meta"):
        model = VAR(VARConfig.from_name("var-d16"))
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 310.3


def test_reference_logits(reference, assert_close_scaled):
    model = load_var(reference["var_state"])
    exported = official_var_state_dict(model)
    assert set(exported) == set(reference["var_state"])
    assert torch.equal(exported["attn_bias_for_masking"], reference["var_state"]["attn_bias_for_masking"])
    assert model.config.depth == 2 and model.config.num_classes == 10
    with torch.no_grad():
        logits = model(reference["labels"], reference["var_input"])
    assert logits.shape == (2, 680, 4096) and logits.dtype == torch.float32
    assert_close_scaled(logits[:, ::5], reference["logits_every5"], 1e-4)


def test_block_causal_mask(reference):
    """Changing the input of scale k changes no logit of an earlier scale, and the logits of scale k do change."""
    model = load_var(reference["var_state"])
    x = reference["var_input"].clone()
    start, stop = model.begin_ends[6]
    with torch.no_grad():
        before = model(reference["labels"], x)
        x[:, start - 1 : stop - 1] += 1.0  # var_input skips the first scale's single position
        after = model(reference["labels"], x)
    assert torch.equal(before[:, :start], after[:, :start])
    assert not torch.allclose(before[:, start:stop], after[:, start:stop])


def test_training_step_backward():
    torch.manual_seed(0)
    model = VAR(VARConfig.from_name("var-tiny", drop_path_rate=0.1)).train()
    labels = torch.tensor([0, 3, 9])
    x = torch.randn(3, model.config.seq_len - 1, model.config.latent_channels)
    logits = model(labels, x)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.randint(0, 1024, (3 * 130,)))
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters()), "every parameter gets a gradient"


def test_bad_inputs_raise_clear_errors(reference):
    model = VAR(VARConfig.from_name("var-tiny"))
    with pytest.raises(ValueError, match=r"x_BLCv must be"):
        model(torch.tensor([1]), torch.zeros(1, 10, 16))
    with pytest.raises(ValueError, match="labels must be long"):
        model(torch.tensor([1.0]), torch.zeros(1, 129, 16))
    with pytest.raises(ValueError, match="not divisible"):
        VARConfig(depth=2, width=100, num_heads=3)
    state = dict(reference["var_state"])
    state["blocks.1.ffn.fc1.weight"] = torch.zeros(512, 127)
    with pytest.raises(ValueError, match=r"'blocks\.1\.ffn\.fc1\.weight' has shape \(512, 127\)"):
        load_var(state)
    state = dict(reference["var_state"])
    state["attn_bias_for_masking"] = torch.zeros(1, 1, 680, 680)
    with pytest.raises(ValueError, match="attn_bias_for_masking.*not the block-causal mask"):
        load_var(state)
    state = dict(reference["var_state"])
    state["blocks.0.attn.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected key 'blocks\.0\.attn\.extra'"):
        load_var(state)
