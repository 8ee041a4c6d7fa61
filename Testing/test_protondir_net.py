"""ProtonDIR's network: shapes, identity at initialisation, optional prior and text, window attention."""
import pytest
import torch

from rtreg.nets.protondir import ProtonDIRNet, SwinBlock3D, TextFiLM, PriorGate
from rtreg.spatial import warp_voxels


def _pair(shape=(32, 36, 40), seed=0):
    g = torch.Generator().manual_seed(seed)
    fixed = torch.nn.functional.avg_pool3d(torch.rand(1, 1, *shape, generator=g), 3, stride=1, padding=1)
    return fixed, torch.roll(fixed, 2, dims=4)


def test_output_shape_and_no_motion_before_training():
    torch.manual_seed(0)
    net = ProtonDIRNet()
    fixed, moving = _pair()
    u = net(fixed, moving)
    assert u.shape == (1, 3, 32, 36, 40)
    with pytest.raises(ValueError, match="at least 32 voxels"):
        net(fixed[..., :20], moving[..., :20])
    assert u.abs().max() < 0.05


def test_missing_prior_and_text_change_nothing_even_when_trained():
    torch.manual_seed(0)
    net = ProtonDIRNet()
    for gate, film in zip(net.gates, net.films):      # as after training: non-zero adapter weights
        torch.nn.init.normal_(gate.conv.weight, std=0.5)
        torch.nn.init.normal_(film.linear.weight, std=0.5)
    for head in net.heads:
        torch.nn.init.normal_(head.weight, std=0.05)
    fixed, moving = _pair()
    none = net(fixed, moving)
    zeros = net(fixed, moving, torch.zeros_like(fixed), torch.zeros(1, 384))
    torch.testing.assert_close(none, zeros)
    prior = torch.zeros_like(fixed)
    prior[..., 8:24, 8:24, 8:24] = 1.0
    with_prior = net(fixed, moving, prior, torch.randn(1, 384))
    assert (with_prior - none).abs().max() > 1e-3          # and present ones do act


def test_zero_initialised_adapters_are_the_identity():
    feat = torch.randn(2, 8, 6, 6, 6)
    torch.testing.assert_close(PriorGate(8)(feat, torch.rand(2, 1, 12, 12, 12)), feat)
    torch.testing.assert_close(TextFiLM(384, 8)(feat, torch.randn(2, 384)), feat)


def test_swin_block_padding_and_shift_do_not_leak():
    torch.manual_seed(0)
    block = SwinBlock3D(8, 2, 4, 2).eval()
    x = torch.randn(1, 8, 6, 7, 9)                          # not multiples of the window: padded inside
    y = block(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    # a change far away (beyond a shifted window's reach) leaves a voxel's output unchanged
    x2 = x.clone()
    x2[..., 5, 6, 8] += 10.0
    torch.testing.assert_close(block(x2)[..., 0, 0, 0], y[..., 0, 0, 0])
    chunked = SwinBlock3D(8, 2, 4, 2, chunk=1).eval()
    chunked.load_state_dict(block.state_dict())
    torch.testing.assert_close(chunked(x), y)


def test_warp_by_whole_voxels_is_a_shift():
    img = torch.rand(1, 2, 6, 7, 8)
    u = torch.zeros(1, 3, 6, 7, 8)
    u[:, 0] = 1.0                                             # +1 voxel along x
    torch.testing.assert_close(warp_voxels(img, u)[..., :-1], img[..., 1:])


def test_the_network_learns_a_translation():
    torch.manual_seed(0)
    net = ProtonDIRNet(channels=(4, 8, 8, 16, 16))
    fixed, moving = _pair((32, 32, 32))
    truth = torch.zeros(1, 3, 32, 32, 32)
    truth[:, 0] = 2.0                                         # moving = fixed rolled by +2 voxels in x
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        opt.zero_grad()
        loss = ((net(fixed, moving) - truth) ** 2).mean()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.2 * first
