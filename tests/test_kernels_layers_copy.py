"""gather_layers / scatter_layers (host KV tier transfers: every layer's rows in one launch)
against the torch reference; Triton's interpreter on a CPU, compiled on a GPU."""
import pytest
import torch

from tests.test_kernels_triton import DEVICE, _gen, _randn, reference, triton_ops


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float8_e4m3fn])
@pytest.mark.parametrize("bs,heads,d", [(16, 2, 64), (4, 3, 32), (1, 1, 16)])
def test_gather_scatter_layers(dtype, bs, heads, d):
    gen = _gen("layers", dtype, bs)
    layers, nblocks = 3, 10
    caches = [tuple(_randn(gen, nblocks * bs, heads, d).to(dtype) for _ in range(2)) for _ in range(layers)]
    blocks = torch.tensor([7, 2, 9, 4], device=DEVICE)
    slots = (blocks[:, None] * bs + torch.arange(bs, device=DEVICE)).reshape(-1)
    shape = (len(blocks), layers, 2, bs, heads, d)
    got = torch.zeros(shape, dtype=dtype, device=DEVICE)
    want = torch.zeros(shape, dtype=dtype, device=DEVICE)
    triton_ops.gather_layers(caches, slots, bs, got, triton_ops.layer_pointers(caches))
    reference.gather_layers(caches, slots, bs, want)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    # back into other blocks: those rows equal the gathered ones, all others untouched
    before = [(k.clone(), v.clone()) for k, v in caches]
    dst = torch.tensor([0, 1, 3, 5], device=DEVICE)
    dslots = (dst[:, None] * bs + torch.arange(bs, device=DEVICE)).reshape(-1)
    triton_ops.scatter_layers(caches, dslots, bs, got)
    for layer, ((k, v), (k0, v0)) in enumerate(zip(caches, before)):
        assert torch.equal(k[dslots].view(torch.uint8), k0[slots].view(torch.uint8))
        assert torch.equal(v[dslots].view(torch.uint8), v0[slots].view(torch.uint8))
        keep = torch.ones(nblocks * bs, dtype=torch.bool, device=DEVICE)
        keep[dslots] = False
        assert torch.equal(k[keep].view(torch.uint8), k0[keep].view(torch.uint8))


def test_layers_copy_checks():
    c = [(torch.zeros(8, 1, 16, device=DEVICE), torch.zeros(8, 1, 16, device=DEVICE))]
    with pytest.raises(ValueError, match="stage must be"):
        triton_ops.gather_layers(c, torch.arange(4, device=DEVICE), 4, torch.zeros(1, 1, 2, 4, 1, 8, device=DEVICE))
