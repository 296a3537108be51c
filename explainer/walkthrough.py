"""MATLAB's "Explore Network Predictions Using Deep Learning Visualization Techniques", step by step,
on the embedded EfficientNet-Lite0 and scikit-image's cat (``explainer walkthrough``;
``examples/walkthrough.py`` runs the same function). Each step writes a figure into ``out_dir``."""
from __future__ import annotations

import html
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .runtime.classifier import Classifier



DPI = 150


def walkthrough(out_dir="walkthrough", verbose: bool = True, quick: bool = False) -> Path:
    import explainer
    from explainer import progress
    from explainer.model.preprocess import resize
    from explainer.viz import figure, imtile, plot_maps, top_k_figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures, timings = [], {}
    steps = progress.bar(total=8, desc="walkthrough", unit="step", verbose=verbose, leave=True)

    def save(fig, name, heading, caption):
        fig.savefig(out / name, dpi=DPI, bbox_inches="tight")
        figures.append((name, heading, caption))

    def step(name):
        timings[name] = time.perf_counter()
        steps.set_description_str(f"walkthrough: {name}")

    def done(name):
        timings[name] = time.perf_counter() - timings[name]
        steps.update()

    # 1. Load the network and the image; classify; the top three classes
    step("classify")
    net = explainer.load()
    image = explainer.sample_image("chelsea")
    top5 = net.top_k(image, 5)
    top3 = top5[:3]
    labels = [p.label for p in top3]
    save(top_k_figure(image, top3, f"{net.name}: the top three classes"), "01_top3.png", "Classify",
         "The image and the network's top three classes with their probabilities")
    done("classify")

    # 2. Early activations: 12 channels of the first ReLU-like layer, tiled
    step("activations")
    early = next(l for l in net.layers() if l.op_type in ("Relu", "Clip") and l.shape and len(l.shape) == 3)
    acts = net.activations(image, early.name)
    fig = figure(6, 4.8)
    ax = fig.subplots()
    ax.imshow(imtile(acts, channels=range(12), grid=(3, 4)), cmap="gray")
    ax.set_title(f"12 channels of {early.name}\n{net.describe_layer(early.name)}", fontsize=9)
    ax.axis("off")
    save(fig, "02_early_activations.png", "Early activations",
         f"Early-layer activations ({net.describe_layer(early.name)}): edges and colours; white is strong")

    # 3. The strongest channel of a deep layer, upsampled beside the image
    deep, _ = explainer.gradcam_layers(net)
    deep_acts = net.activations(image, deep)
    strongest = int(deep_acts.mean(axis=(1, 2)).argmax())
    up = resize(deep_acts[strongest][:, :, None], image.shape[:2], clip=False)[:, :, 0]
    fig = figure(9, 3.8)
    axes = fig.subplots(1, 2)
    axes[0].imshow(image)
    axes[0].set_title("image", fontsize=9)
    axes[1].imshow(explainer.mat2gray(up), cmap="gray")
    axes[1].set_title(f"channel {strongest} of {deep}\n{net.describe_layer(deep)}", fontsize=9)
    for a in axes:
        a.axis("off")
    save(fig, "03_strongest_deep_channel.png", "The strongest deep channel",
         f"The most active channel of the deepest feature layer ({net.describe_layer(deep)}), upsampled")
    done("activations")

    # 4. Grad-CAM on the deep layer and on a shallow layer
    step("gradcam")
    shallow = [l for l in net.layers() if l.op_type == "Add" and l.shape and l.shape[1] >= 28][-1].name
    save(plot_maps(image, explainer.gradcam(net, image, labels[0]),
                   explainer.gradcam(net, image, labels[0], feature_layer=shallow),
                   f"Grad-CAM on {deep}\n{net.describe_layer(deep)}",
                   f"Grad-CAM on {shallow}\n{net.describe_layer(shallow)}"),
         "04_gradcam_deep_vs_shallow.png", "Grad-CAM, deep and shallow",
         f"Grad-CAM for {labels[0]}: the deep layer gives coarse, class-specific regions; the shallow one finer, "
         "less specific detail (jet: red is strong)")
    done("gradcam")

    # 5. Occlusion sensitivity: defaults vs a finer stride and a smaller mask
    step("occlusion")
    save(plot_maps(image, explainer.occlusion_sensitivity(net, image, labels[0], verbose=verbose),
                   explainer.occlusion_sensitivity(net, image, labels[0], stride=10, mask_size=15, verbose=verbose),
                   "Occlusion, default mask and stride", "Occlusion, stride 10, mask 15"),
         "05_occlusion.png", "Occlusion sensitivity", f"Occlusion sensitivity for {labels[0]}: how much the probability drops when a patch "
                             "is hidden (red); blue patches raise it when hidden")
    done("occlusion")

    # 6. LIME for the top two classes
    step("lime")
    lime_maps = explainer.image_lime(net, image, labels[:2], random_state=0, verbose=verbose)
    save(plot_maps(image, lime_maps[0], lime_maps[1], f"LIME: {labels[0]}", f"LIME: {labels[1]}"),
         "06_lime_top2.png", "LIME", "LIME on superpixels for the top two classes: the weight of each superpixel in a "
                             "linear fit of the score (red for the class, blue against)")
    done("lime")

    # 7. Gradient attribution vs guided backpropagation
    step("gradients")
    save(plot_maps(image, explainer.gradient_attribution(net, image, labels[0]),
                   explainer.gradient_attribution(net, image, labels[0], method="guided-backprop"),
                   "Gradient attribution", "Guided backpropagation"),
         "07_gradients.png", "Gradient attribution and guided backpropagation", f"Pixel-level gradients of {labels[0]}'s score, plain and guided; the colour's "
                             "opacity follows the value, so the image shows where the gradient is small")
    done("gradients")

    # 8. Deep dream for the top three classes: plain and detailed
    step("deepdream")
    scores = explainer.gradcam_layers(net)[1]
    plain = explainer.deep_dream_image(net, scores, labels, random_state=0, verbose=verbose)
    # quick: every figure, with the detailed deep dream cut to a sketch (it is most of the time)
    iterations, levels = (15, 2) if quick else (100, 4)
    detailed = explainer.deep_dream_image(net, scores, labels, num_iterations=iterations, pyramid_levels=levels,
                                          random_state=0, verbose=verbose)
    fig = figure(10, 7)
    axes = fig.subplots(2, 3)
    for k, name in enumerate(labels):
        for row, imgs, what in ((0, plain, "10 iterations, 3 levels"),
                                (1, detailed, f"{iterations} iterations, {levels} levels")):
            axes[row, k].imshow(imgs[k])
            axes[row, k].set_title(f"{name}\n{what}", fontsize=8)
            axes[row, k].axis("off")
    save(fig, "08_deepdream.png", "Deep dream", "Deep dream images of the top three classes: what the network would call "
                                  "each class, grown from noise by gradient ascent on its score")
    done("deepdream")
    steps.close()

    (out / "index.html").write_text(_page(net, top5, figures, timings), encoding="utf-8")
    (out / "timings.json").write_text(json.dumps({k: round(v, 2) for k, v in timings.items()}, indent=1))
    if verbose:
        print(f"wrote {out / 'index.html'} ({sum(timings.values()):.0f} s)")
    return out / "index.html"


def _page(net: Classifier, top5, figures, timings) -> str:
    """The walkthrough's index.html: the scores, each figure with its caption, the timings."""
    from .pages import page, score_table

    esc = html.escape
    sections = "".join(f"<section><h2>{i}. {esc(heading)}</h2><figure><img src='{esc(name)}' "
                       f"alt='{esc(caption)}'><figcaption>{esc(caption)}</figcaption></figure></section>"
                       for i, (name, heading, caption) in enumerate(figures, 1))
    times = "".join(f"<tr><td>{esc(k)}</td><td class='num'>{v:.1f} s</td></tr>" for k, v in timings.items())
    body = (f"<section><h2>Top five classes</h2>{score_table(top5)}</section>{sections}"
            f"<section><h2>Timings</h2><table>{times}<tr><th>total</th><th class='num'>"
            f"{sum(timings.values()):.1f} s</th></tr></table></section>")
    return page(f"Explore network predictions: {net.name}",
                "MATLAB's visualization walkthrough, step by step, with onnx-explainer", body)
