"""MATLAB's "Explore Network Predictions Using Deep Learning Visualization Techniques", step by step,
on the embedded EfficientNet-Lite0 and scikit-image's cat (``explainer walkthrough``;
``examples/walkthrough.py`` runs the same function). Each step writes a figure into ``out_dir``."""
from __future__ import annotations

import time
from pathlib import Path



def walkthrough(out_dir="walkthrough", verbose: bool = True, quick: bool = False) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import explainer
    from explainer.viz import imtile, plot_maps

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures, timings = [], {}

    def save(fig, name, caption):
        fig.savefig(out / name, dpi=72, bbox_inches="tight")
        plt.close(fig)
        figures.append((name, caption))

    def step(name):
        timings[name] = time.perf_counter()
        if verbose:
            print(f"== {name}", flush=True)

    def done(name):
        timings[name] = time.perf_counter() - timings[name]

    # 1. Load the network and the image; classify; the top three classes
    step("classify")
    net = explainer.load()
    image = explainer.sample_image("chelsea")
    top3 = net.top_k(image, 3)
    labels = [p.label for p in top3]
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.imshow(image)
    ax.set_title(", ".join(f"{p.label} {p.score:.2f}" for p in top3), fontsize=9)
    ax.axis("off")
    save(fig, "01_top3.png", "The image and the network's top three classes")
    done("classify")

    # 2. Early activations: 12 channels of the first ReLU-like layer, tiled
    step("activations")
    early = next(l for l in net.layers() if l.op_type in ("Relu", "Clip") and l.shape and len(l.shape) == 3)
    acts = net.activations(image, early.name)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.imshow(imtile(acts, channels=range(12), grid=(3, 4)), cmap="gray")
    ax.set_title(f"12 channels of {early.name} ({early.op_type})", fontsize=9)
    ax.axis("off")
    save(fig, "02_early_activations.png", "Early-layer activations: edges and colours")

    # 3. The strongest channel of a deep layer, upsampled beside the image
    deep, _ = explainer.gradcam_layers(net)
    deep_acts = net.activations(image, deep)
    strongest = int(deep_acts.mean(axis=(1, 2)).argmax())
    from explainer.model.preprocess import resize

    up = resize(deep_acts[strongest][:, :, None], image.shape[:2], clip=False)[:, :, 0]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    axes[0].imshow(image)
    axes[1].imshow(explainer.mat2gray(up), cmap="gray")
    axes[1].set_title(f"strongest channel {strongest} of {deep}", fontsize=9)
    for a in axes:
        a.axis("off")
    save(fig, "03_strongest_deep_channel.png", "The most active deep channel, upsampled")
    done("activations")

    # 4. Grad-CAM on the deep layer and on a shallow layer
    step("gradcam")
    shallow = [l for l in net.layers() if l.op_type == "Add" and l.shape and l.shape[1] >= 28][-1].name
    save(plot_maps(image, explainer.gradcam(net, image, labels[0]),
                   explainer.gradcam(net, image, labels[0], feature_layer=shallow),
                   f"Grad-CAM, deep layer {deep}", f"Grad-CAM, shallow layer {shallow}"),
         "04_gradcam_deep_vs_shallow.png", "Grad-CAM: deep layers give coarse, class-specific regions")
    done("gradcam")

    # 5. Occlusion sensitivity: defaults vs a finer stride and a smaller mask
    step("occlusion")
    save(plot_maps(image, explainer.occlusion_sensitivity(net, image, labels[0], verbose=verbose),
                   explainer.occlusion_sensitivity(net, image, labels[0], stride=10, mask_size=15, verbose=verbose),
                   "Occlusion, default mask and stride", "Occlusion, stride 10, mask 15"),
         "05_occlusion.png", "Occlusion sensitivity: what the probability loses when a patch is hidden")
    done("occlusion")

    # 6. LIME for the top two classes
    step("lime")
    lime_maps = explainer.image_lime(net, image, labels[:2], random_state=0, verbose=verbose)
    save(plot_maps(image, lime_maps[0], lime_maps[1], f"LIME: {labels[0]}", f"LIME: {labels[1]}"),
         "06_lime_top2.png", "LIME on superpixels for the top two classes")
    done("lime")

    # 7. Gradient attribution vs guided backpropagation
    step("gradients")
    save(plot_maps(image, explainer.gradient_attribution(net, image, labels[0]),
                   explainer.gradient_attribution(net, image, labels[0], method="guided-backprop"),
                   "Gradient attribution", "Guided backpropagation", alpha=0.7, cmap="inferno"),
         "07_gradients.png", "Pixel-level gradients: plain and guided")
    done("gradients")

    # 8. Deep dream for the top three classes: plain and detailed
    step("deepdream")
    scores = explainer.gradcam_layers(net)[1]
    plain = explainer.deep_dream_image(net, scores, labels, random_state=0, verbose=False)
    # quick: every figure, with the detailed deep dream cut to a sketch (it is most of the time)
    iterations, levels = (15, 2) if quick else (100, 4)
    detailed = explainer.deep_dream_image(net, scores, labels, num_iterations=iterations, pyramid_levels=levels,
                                          random_state=0, verbose=False)
    fig, axes = plt.subplots(2, 3, figsize=(10, 7))
    for k, name in enumerate(labels):
        for row, imgs, what in ((0, plain, "10 iterations, 3 levels"),
                                (1, detailed, f"{iterations} iterations, {levels} levels")):
            axes[row, k].imshow(imgs[k])
            axes[row, k].set_title(f"{name}\n{what}", fontsize=8)
            axes[row, k].axis("off")
    save(fig, "08_deepdream.png", "Deep dream images of the top three classes")
    done("deepdream")

    rows = "".join(f"<figure><img src='{n}' alt='{c}'><figcaption>{c}</figcaption></figure>" for n, c in figures)
    times = "".join(f"<li>{k}: {v:.1f} s</li>" for k, v in timings.items())
    (out / "index.html").write_text(
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>walkthrough</title></head><body>"
        f"<h1>Explore network predictions: {net.name}</h1>{rows}<h2>Timings</h2><ul>{times}</ul></body></html>",
        encoding="utf-8")
    if verbose:
        print(f"wrote {out / 'index.html'} ({sum(timings.values()):.0f} s)")
    return out / "index.html"
