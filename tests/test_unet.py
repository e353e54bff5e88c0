"""UNet: shapes, zero-initialised output, label handling, classifier-free guidance at scale 1."""

import pytest
import torch

from gm.diffusion import GaussianDiffusion
from gm.unet import UNet, timestep_embedding


def tiny_unet(**kwargs) -> UNet:
    return UNet(**{"in_channels": 3, "base_channels": 16, "channel_mults": (1, 2), "num_classes": 10, **kwargs})


@pytest.mark.parametrize(("mults", "size", "blocks"), [((1, 2), 8, 1), ((1, 2, 2), 8, 2), ((1,), 6, 1)])
def test_shapes(mults, size, blocks):
    model = tiny_unet(channel_mults=mults, num_res_blocks=blocks)
    x = torch.randn(3, 3, size, size)
    out = model(x, torch.tensor([0, 500, 999]), torch.tensor([0, 9, 10]))
    assert out.shape == x.shape
    assert tiny_unet(out_channels=6)(x, torch.zeros(3, dtype=torch.long)).shape == (3, 6, size, size)


def test_widths_that_are_not_multiples_of_eight():
    model = tiny_unet(base_channels=12)  # widths 12 and 24: GroupNorm with gcd(8, width) = 4 and 8 groups
    assert [m.num_groups for m in model.modules() if isinstance(m, torch.nn.GroupNorm)][:2] == [4, 4]
    x = torch.randn(2, 3, 8, 8)
    assert model(x, torch.tensor([3, 700]), torch.tensor([1, 10])).shape == x.shape


def test_zero_initialised_output_then_trainable():
    model = tiny_unet()
    x, t, y = torch.randn(4, 3, 8, 8), torch.randint(0, 1000, (4,)), torch.randint(0, 10, (4,))
    assert torch.equal(model(x, t, y), torch.zeros_like(x))
    # The first loss of eps-prediction is exactly E[eps^2]; a gradient still reaches the output conv.
    loss = GaussianDiffusion(timesteps=1000).p_losses(model, x, t, y, noise=torch.ones_like(x))
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    assert model.output[-1].weight.grad.abs().sum() > 0


def test_conditioning_changes_the_output():
    model = tiny_unet()
    torch.nn.init.normal_(model.output[-1].weight, std=0.1)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 10])
    a, b = model(x, t, torch.tensor([1, 1])), model(x, t, torch.tensor([2, 2]))
    assert (a - b).abs().max() > 1e-4
    late = model(x, torch.tensor([900, 900]), torch.tensor([1, 1]))
    assert (a - late).abs().max() > 1e-4
    torch.testing.assert_close(model(x, t, None), model(x, t, torch.tensor([10, 10])))  # None = the null label


def test_cfg_scale_one_equals_conditional_model():
    torch.manual_seed(0)
    model = tiny_unet().eval()
    torch.nn.init.normal_(model.output[-1].weight, std=0.1)
    diffusion = GaussianDiffusion(timesteps=50)
    y = torch.arange(4)
    noise = torch.randn(4, 3, 8, 8)
    guided = diffusion.sample(model, noise.shape, y, sampler="ddim", steps=5, guidance_scale=1.0, noise=noise,
                              progress=False)
    plain = diffusion.sample(lambda x, t, yy: model(x, t, yy), noise.shape, y, sampler="ddim", steps=5, noise=noise,
                             progress=False, null_label=10)
    assert torch.equal(guided, plain)
    stronger = diffusion.sample(model, noise.shape, y, sampler="ddim", steps=5, guidance_scale=3.0, noise=noise,
                                progress=False)
    assert (stronger - guided).abs().max() > 1e-4


def test_bad_input_is_rejected():
    model = tiny_unet()
    with pytest.raises(ValueError, match="shape"):
        model(torch.randn(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(2, 3, 7, 7), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be"):
        model.check_labels(torch.tensor([0, 11]))
    with pytest.raises(ValueError, match="labels must be"):
        model.check_labels(torch.tensor([-1, 3]))
    model.check_labels(torch.tensor([0, 10]))  # 10 = the null label
    with pytest.raises(IndexError):  # forward does not read label values; the embedding lookup fails
        model(torch.randn(2, 3, 8, 8), torch.zeros(2, dtype=torch.long), torch.tensor([0, 11]))
    with pytest.raises(ValueError, match="unconditional"):
        tiny_unet(num_classes=0)(torch.randn(2, 3, 8, 8), torch.zeros(2, dtype=torch.long), torch.tensor([0, 1]))


def test_timestep_embedding():
    emb = timestep_embedding(torch.tensor([0, 1, 999]), 9)
    assert emb.shape == (3, 9)
    torch.testing.assert_close(emb[0, :4], torch.ones(4))  # cos(0) = 1
    assert len({tuple(r.tolist()) for r in emb}) == 3
