"""Deep dream per-iteration time: ours (converted module, hooks) vs the same loop on native torch."""
from __future__ import annotations


from .run import timed


def bench(rows, net, native, repeats, iterations=10):
    import torch

    import explainer

    layer = explainer.gradcam_layers(net)[1]
    ours = timed(lambda: explainer.deep_dream_image(net, layer, [285, 282, 281], num_iterations=iterations,
                                                    pyramid_levels=1, random_state=0, verbose=False), repeats)

    def native_loop():
        x = torch.full((3, 3, 224, 224), 128.0)
        target = torch.tensor([285, 282, 281])
        for _ in range(iterations):
            xi = x.detach().requires_grad_(True)
            out = native.model(xi)
            grad = torch.autograd.grad(out[torch.arange(3), target].sum(), xi)[0]
            x = (x + 2.0 * grad / grad.abs().mean(dim=(1, 2, 3), keepdim=True)).clamp(0, 255)
        return x

    other = timed(native_loop, repeats)
    rows.append(dict(model="efficientnet_lite0", method="deep dream",
                     what=f"per iteration, 3 channels: ours / native torch loop", ours_s=ours / iterations,
                     other_s=other / iterations, ratio=ours / other))
