"""Deep dream per-iteration time: ours (converted module, hooks) vs the same loop written directly in
torch on a reference model (the native definition, or the converted module where none exists)."""
from __future__ import annotations

from .run import paired


def bench(rows, net, name, model, repeats, iterations=10):
    import torch

    import explainer

    layer = explainer.gradcam_layers(net)[1]
    ours_fn = lambda: explainer.deep_dream_image(net, layer, [285, 282, 281], num_iterations=iterations,
                                                 pyramid_levels=1, random_state=0, verbose=False)

    def native_loop():
        x = torch.full((3, 3, 224, 224), 128.0)
        target = torch.tensor([285, 282, 281])
        for _ in range(iterations):
            xi = x.detach().requires_grad_(True)
            out = model(xi)
            grad = torch.autograd.grad(out[torch.arange(3), target].sum(), xi)[0]
            x = (x + 2.0 * grad / grad.abs().mean(dim=(1, 2, 3), keepdim=True)).clamp(0, 255)
        return x

    ours, other, ratio = paired(ours_fn, native_loop, repeats)
    rows.append(dict(model=name, method="deep dream", what="per iteration, 3 channels: ours / the same loop in "
                     "plain torch", ours_s=ours / iterations, other_s=other / iterations, ratio=ratio))
