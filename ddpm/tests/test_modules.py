"""In-process tests of the UNet, the Diffusion class and the image helpers."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from core import images
from ddpm_conditional import Diffusion
from modules import Level, SelfAttention, UNet, UNet_conditional, build_model, count_parameters
from utils import ImageDataset

torch.set_num_threads(1)


def tiny_conditional(channels=1, size=16, num_classes=3):
    torch.manual_seed(0)
    model = UNet_conditional(
        c_in=channels, c_out=channels, num_classes=num_classes, img_size=size, base_channels=8, time_dim=32
    )
    for p in model.parameters():  # random non-zero output layer, so guidance changes the prediction
        p.data.normal_(0, 0.05)
    return model.eval()


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [16, 24, 32, 64, 256])
def test_output_shape_follows_channels_and_size(channels, size):
    model = UNet_conditional(
        c_in=channels, c_out=channels, num_classes=4, img_size=size, base_channels=8, time_dim=32
    )
    x = torch.randn(2, channels, size, size)
    assert model(x, torch.tensor([0, 999]), torch.tensor([1, 4])).shape == x.shape
    assert (
        UNet(c_in=channels, c_out=channels, img_size=size, base_channels=8)(x, torch.tensor([3, 7])).shape
        == x.shape
    )


def test_attention_resolutions_and_width_are_configurable():
    model = UNet(img_size=32, base_channels=16, attn_resolutions=[8])
    attn = [m for m in model.modules() if isinstance(m, SelfAttention)]
    assert len(attn) == 3  # one level down, the bottleneck, one level up
    assert model.config["attn_resolutions"] == [8] and model.config["base_channels"] == 16
    assert count_parameters(UNet(img_size=32, base_channels=32))["total"] > count_parameters(model)["total"]


@pytest.mark.parametrize("size", [8, 20, 30])
def test_unsupported_sizes_are_rejected(size):
    with pytest.raises(ValueError, match="multiple of 8"):
        UNet(img_size=size)


def test_sdpa_attention_matches_plain_softmax():
    torch.manual_seed(0)
    attn = SelfAttention(64)
    torch.nn.init.normal_(attn.proj.weight, std=0.1)
    x = torch.randn(2, 64, 4, 4)
    qkv = attn.qkv(attn.norm(x)).reshape(2, 3, attn.num_heads, 32, 16).transpose(-1, -2)
    q, k, v = qkv.unbind(1)
    weights = torch.softmax(q @ k.transpose(-1, -2) / 32**0.5, dim=-1)
    expected = x + attn.proj((weights @ v).transpose(-1, -2).reshape(2, 64, 4, 4))
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)


def test_cfg_scale_zero_is_unconditional_and_one_is_conditional():
    model = tiny_conditional()
    x, t, y = torch.randn(3, 1, 16, 16), torch.tensor([10, 500, 900]), torch.tensor([0, 1, 2])
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, None)
        assert not torch.allclose(cond, uncond)
        torch.testing.assert_close(Diffusion.guided_noise(model, x, t, y, 0), uncond)
        torch.testing.assert_close(Diffusion.guided_noise(model, x, t, y, 1), cond)
        torch.testing.assert_close(
            Diffusion.guided_noise(model, x, t, y, 3), uncond + 3 * (cond - uncond), atol=1e-5, rtol=1e-5
        )


def test_cfg_runs_one_forward_and_doubles_the_batch_only_when_guiding():
    model = tiny_conditional()
    seen = []
    model.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].shape[0]))
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([1, 2]), torch.tensor([0, 1])
    with torch.no_grad():
        for scale in (0, 1, 4):
            Diffusion.guided_noise(model, x, t, y, scale)
    assert seen == [2, 2, 4]


@pytest.mark.parametrize("sampler,steps", [("ddpm", None), ("ddpm", 20), ("ddim", 10)])
def test_samplers_return_uint8_images(sampler, steps, capsys):
    model = tiny_conditional()
    diffusion = Diffusion(noise_steps=100, img_size=16, device="cpu")
    labels = torch.tensor([0, 2])
    out = diffusion.sample(
        model,
        2,
        labels,
        cfg_scale=3,
        sampler=sampler,
        steps=steps,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.dtype == torch.uint8 and out.shape == (2, 1, 16, 16)
    expected_steps = steps or 100
    assert f"2 images, {expected_steps} steps" in capsys.readouterr().out


def test_ddim_eta_zero_is_deterministic_and_eta_adds_noise():
    model = tiny_conditional()
    diffusion = Diffusion(noise_steps=100, img_size=16, device="cpu")

    def run(eta, seed):
        gen = torch.Generator().manual_seed(seed)
        return diffusion.sample(
            model, 2, None, log_time=False, sampler="ddim", steps=10, eta=eta, generator=gen
        )

    assert torch.equal(run(0.0, 1), run(0.0, 1))
    assert not torch.equal(run(0.0, 1), run(1.0, 1))


def test_loss_falls_on_a_tiny_set():
    torch.manual_seed(0)
    model = UNet_conditional(c_in=1, c_out=1, num_classes=2, img_size=16, base_channels=8, time_dim=32)
    diffusion = Diffusion(noise_steps=100, img_size=16, device="cpu")
    x = torch.zeros(8, 1, 16, 16)
    x[:4, :, 2:6], x[4:, :, 10:14] = 1.0, 1.0
    y = torch.tensor([0] * 4 + [1] * 4)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen, losses = torch.Generator().manual_seed(0), []
    for _ in range(80):
        t = diffusion.sample_timesteps(8, gen)
        noise = torch.randn(x.shape, generator=gen)
        loss = F.mse_loss(model(diffusion.noise_images(x, t, noise), t, y), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10])


def test_load_state_dict_takes_bare_weights_or_a_training_checkpoint():
    source = tiny_conditional()
    bare = UNet_conditional(c_in=1, c_out=1, num_classes=3, img_size=16, base_channels=8, time_dim=32)
    bare.load_state_dict(source.state_dict())
    full = build_model(source.config)
    full.load_state_dict(
        {"format": "ddpm-checkpoint-v1", "model": source.state_dict(), "model_config": source.config}
    )
    for model in (bare, full):
        for a, b in zip(model.state_dict().values(), source.state_dict().values(), strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize(
    "make,channels",
    [
        (lambda a: Image.fromarray(a, "L"), 1),
        (lambda a: Image.fromarray(np.stack([a, a // 2, a], -1), "RGB"), 3),
        (lambda a: Image.fromarray(np.stack([a, a, a, a], -1), "RGBA"), 3),
        (lambda a: Image.fromarray(a, "L").convert("P"), 1),
        (lambda a: Image.fromarray(a.astype(np.uint16) * 257), 1),
    ],
    ids=["gray", "rgb", "rgba", "palette", "16bit"],
)
def test_image_modes_load_with_the_right_channels_and_range(tmp_path, make, channels):
    arr = np.linspace(0, 255, 64, dtype=np.uint8).reshape(8, 8)
    path = tmp_path / "img.png"
    make(arr).save(path)
    found = images.scan([path])
    assert found["channels"] == channels
    x, _ = ImageDataset([path], [0], 8, channels, found["intensity"])[0]
    assert x.shape == (channels, 8, 8)
    # 16-bit is scaled, not clipped to black/white.
    assert abs(x.max().item() - 1) <= 2 / 255 and x.min().item() == -1


def test_gradient_checkpointing_gives_the_same_gradients(monkeypatch):
    model = tiny_conditional().train()
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([5, 50]), torch.tensor([0, 3])

    def grads():
        model.zero_grad()
        model(x, t, y).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    calls, level_forward = [], Level._forward
    monkeypatch.setattr(Level, "_forward", lambda self, *args: calls.append(1) or level_forward(self, *args))
    plain = grads()
    model.set_grad_checkpointing()
    for a, b in zip(plain, grads(), strict=True):
        torch.testing.assert_close(a, b)
    levels = sum(isinstance(m, Level) for m in model.modules())
    assert len(calls) == 3 * levels  # once per level without checkpointing, twice (with recompute) with it
