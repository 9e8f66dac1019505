"""The DiT model: official key layout and sizes, adaLN-Zero, attention, any size and class count."""

import argparse

import pytest
import torch

from models import DiT, DiT_models, plain_attention

# Parameter counts from the reference (256 px, 1000 classes, frozen positional table included).
REFERENCE_COUNTS = {
    "DiT-S/2": 32_963_360, "DiT-S/4": 32_945_024, "DiT-S/8": 33_148_160,
    "DiT-B/2": 130_512_416, "DiT-B/4": 130_475_648, "DiT-B/8": 130_881_536,
    "DiT-L/2": 458_102_816, "DiT-L/4": 458_053_760, "DiT-L/8": 458_594_816,
    "DiT-XL/2": 675_129_632, "DiT-XL/4": 675_074_432, "DiT-XL/8": 675_683_072,
}  # fmt: skip
ARCH = {"S": (12, 384), "B": (12, 768), "L": (24, 1024), "XL": (28, 1152)}


def meta_model(name, input_size=32, num_classes=1000):
    with torch.device("meta"):
        return DiT_models[name](input_size=input_size, num_classes=num_classes)


def expected_shapes(depth, d, p, tokens, num_classes=1000, out_channels=8):
    """Every state_dict key of the published layout with its shape."""
    shapes = {
        "pos_embed": (1, tokens, d),
        "x_embedder.proj.weight": (d, 4, p, p), "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (num_classes + 1, d),
        "final_layer.linear.weight": (p * p * out_channels, d),
        "final_layer.linear.bias": (p * p * out_channels,),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d), "final_layer.adaLN_modulation.1.bias": (2 * d,),
    }  # fmt: skip
    for i in range(depth):
        block = {
            "attn.qkv.weight": (3 * d, d), "attn.qkv.bias": (3 * d,),
            "attn.proj.weight": (d, d), "attn.proj.bias": (d,),
            "mlp.fc1.weight": (4 * d, d), "mlp.fc1.bias": (4 * d,),
            "mlp.fc2.weight": (d, 4 * d), "mlp.fc2.bias": (d,),
            "adaLN_modulation.1.weight": (6 * d, d), "adaLN_modulation.1.bias": (6 * d,),
        }  # fmt: skip
        shapes.update({f"blocks.{i}.{k}": v for k, v in block.items()})
    return shapes


@pytest.mark.parametrize("name", sorted(REFERENCE_COUNTS))
def test_variant_matches_reference_keys_shapes_and_count(name):
    size, patch = name[4:].split("/")
    depth, hidden = ARCH[size]
    p = int(patch)
    state = meta_model(name).state_dict()
    got = {k: tuple(v.shape) for k, v in state.items()}
    assert got == expected_shapes(depth, hidden, p, (32 // p) ** 2)
    assert sum(v.numel() for v in state.values()) == REFERENCE_COUNTS[name]


def test_xl2_has_292_tensors_and_512px_count():
    assert len(meta_model("DiT-XL/2").state_dict()) == 292
    state = meta_model("DiT-XL/2", input_size=64).state_dict()
    assert state["pos_embed"].shape == (1, 1024, 1152)
    assert sum(v.numel() for v in state.values()) == 676_014_368


def tiny(**kwargs):
    config = dict(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=3)
    return DiT(**{**config, **kwargs})


def inputs(n=3, size=8, num_classes=3):
    torch.manual_seed(1)
    return (
        torch.randn(n, 4, size, size),
        torch.randint(0, 1000, (n,)),
        torch.randint(0, num_classes + 1, (n,)),
    )


def test_fresh_model_outputs_zero_and_pos_embed_is_frozen():
    model = tiny()
    out = model(*inputs())
    assert out.shape == (3, 8, 8, 8)
    assert torch.count_nonzero(out) == 0
    assert not model.pos_embed.requires_grad
    # The zero output comes from the zeroed modulation and output layers, not from dead inputs.
    torch.nn.init.normal_(model.final_layer.linear.weight)
    torch.nn.init.normal_(model.final_layer.adaLN_modulation[-1].weight)
    assert model(*inputs()).abs().mean() > 0


def test_sincos_tables_follow_the_published_layout():
    model = tiny(input_size=16)  # 8 x 8 grid
    table = model.pos_embed[0]  # (T, D)
    half = table.shape[1] // 2
    # Token 1 is (row 0, col 1) and token 8 is (row 1, col 0): first half encodes the column, second the row.
    assert torch.allclose(table[1, :half], table[8, half:])
    assert torch.allclose(table[0, : half // 2], torch.zeros(half // 2))  # sin(0)
    features = model.t_embedder.sinusoid(torch.tensor([0.0]))
    assert torch.equal(features[0, :128], torch.ones(128)) and torch.equal(
        features[0, 128:], torch.zeros(128)
    )


def test_sdpa_matches_plain_attention():
    q, k, v = torch.randn(3, 2, 2, 16, 8).unbind(0)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(sdpa, plain_attention(q, k, v), atol=1e-5)
    model = tiny()
    torch.nn.init.normal_(model.final_layer.linear.weight)
    torch.nn.init.normal_(model.blocks[0].adaLN_modulation[-1].weight)
    plain = tiny(attention="plain")
    plain.load_state_dict(model.state_dict())
    assert torch.allclose(model(*inputs()), plain(*inputs()), atol=1e-5)


@pytest.mark.parametrize("size,patch,classes", [(12, 2, 1), (16, 4, 7), (24, 8, 2)])
def test_any_latent_size_and_class_count(size, patch, classes):
    model = tiny(input_size=size, patch_size=patch, num_classes=classes)
    x, t, y = inputs(2, size, classes)
    assert model(x, t, y).shape == (2, 8, size, size)
    assert model.y_embedder.embedding_table.weight.shape[0] == classes + 1


def test_latent_size_must_be_a_multiple_of_the_patch():
    with pytest.raises(ValueError, match="multiple of the patch"):
        tiny(input_size=10, patch_size=4)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = flag
        model(*inputs()).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads, strict=True))


@pytest.mark.parametrize("layout", ["plain state_dict", "original train.py checkpoint"])
def test_official_style_state_dict_round_trip(workspace, tmp_path, layout):
    """Official files (a plain EMA state_dict, as DiT-XL-2-256x256.pt) load strictly through sample.py."""
    from sample import build_parser, load_model

    torch.manual_seed(3)
    source = DiT_models["DiT-S/4"](input_size=8, num_classes=5, depth=1, hidden_size=24, num_heads=2)
    for p in source.parameters():
        torch.nn.init.normal_(p)
    state = source.state_dict()
    if layout != "plain state_dict":  # facebookresearch/DiT train.py keeps its argparse.Namespace
        state = {"model": {}, "ema": state, "opt": {}, "args": argparse.Namespace(model="DiT-S/4", vae="ema")}
    torch.save(state, tmp_path / "official.pt")
    flags = ["--ckpt", tmp_path / "official.pt", "--vae", workspace / "vae", "--model", "DiT-S/4"]
    flags += ["--depth", 1, "--hidden-size", 24, "--num-heads", 2]
    model, config, _, _ = load_model(build_parser(ddp=False).parse_args(map(str, flags)), torch.device("cpu"))
    assert (config["image_size"], config["num_classes"], config["patch_size"], config["depth"]) == (
        16,
        5,
        4,
        1,
    )
    # Official files carry no decoding rule: they are 8-bit RGB models.
    assert config["intensity"] == {"kind": "integer", "bit_depth": 8} and config["channels"] == 3
    loaded, original = model.state_dict(), source.state_dict()
    assert loaded.keys() == original.keys()
    assert all(torch.equal(loaded[k], original[k]) for k in original)


def test_rope_is_a_rotation_with_relative_logits():
    """RoPE keeps each head vector's norm, and q.k depends on the two patches' positions only through
    their difference (row and column), which is what lets a model move to other grid sizes."""
    from models import apply_rope, rope_tables

    grid, head_dim = 5, 16
    rope = rope_tables(grid, head_dim)
    x = torch.randn(2, 3, grid * grid, head_dim)  # (N, H, T, D/H)
    assert torch.allclose(apply_rope(x, rope).norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    # The same q and k at every position: the logits then differ only through the rotations.
    q = apply_rope(torch.randn(head_dim).expand(1, 1, grid * grid, head_dim), rope)[0, 0]
    k = apply_rope(torch.randn(head_dim).expand(1, 1, grid * grid, head_dim), rope)[0, 0]
    logits = (q @ k.T).view(grid, grid, grid, grid)  # (row_q, col_q, row_k, col_k)
    shift = (2, 1)
    for rq, cq, rk, ck in [(0, 0, 1, 2), (1, 3, 0, 0), (2, 2, 2, 0), (0, 1, 1, 1)]:
        moved = logits[rq + shift[0], cq + shift[1], rk + shift[0], ck + shift[1]]
        assert torch.allclose(logits[rq, cq, rk, ck], moved, atol=1e-5)
    # Rows and columns each matter: other offsets give other logits.
    assert not torch.allclose(logits[0, 0, 0, 1], logits[0, 0, 1, 0], atol=1e-3)
    assert not torch.allclose(logits[0, 0, 0, 1], logits[0, 0, 0, 2], atol=1e-3)


def test_rope_model_has_no_table_and_runs_at_other_sizes():
    model = tiny(pos_embed="rope", learn_sigma=False)
    assert model.pos_embed is None and "pos_embed" not in model.state_dict()
    torch.nn.init.normal_(model.final_layer.linear.weight)
    torch.nn.init.normal_(model.blocks[0].adaLN_modulation[-1].weight)
    for size in (8, 16, 12):  # built for 8 x 8 latents
        x, t, y = inputs(2, size)
        out = model(x, t, y)
        assert out.shape == (2, 4, size, size) and torch.isfinite(out).all()
    # Positions reach the output: without any, rolling the patches cyclically would just roll the output
    # (as it does for a zeroed sin-cos table); RoPE sees the wrapped patches' new offsets.
    x, t, y = inputs(2, 8)
    no_positions = tiny(learn_sigma=False)
    table = torch.zeros_like(no_positions.pos_embed)
    no_positions.load_state_dict({**model.state_dict(), "pos_embed": table})
    for net, equivariant in ((no_positions, True), (model, False)):
        rolled = net(x.roll(2, dims=-2), t, y)  # one patch row down
        assert torch.allclose(rolled, net(x, t, y).roll(2, dims=-2), atol=1e-5) is equivariant
    with pytest.raises(ValueError, match="divisible by 4"):
        tiny(pos_embed="rope", hidden_size=36, num_heads=6)


def test_rope_gradient_checkpointing_and_sdpa_match():
    model = tiny(pos_embed="rope")
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    plain = tiny(pos_embed="rope", attention="plain")
    plain.load_state_dict(model.state_dict())
    assert torch.allclose(model(*inputs()), plain(*inputs()), atol=1e-5)
    model.train()
    model.gradient_checkpointing = True
    assert torch.allclose(model(*inputs()), plain(*inputs()), atol=1e-5)
