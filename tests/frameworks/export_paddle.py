"""PaddlePaddle vision models (``paddle.vision.models``, ``pretrained=False``) exported with
paddle2onnx through ``paddle.onnx.export`` (which saves a static program, converts it and folds
constants with polygraphy). Runs in the paddle venv (build.py).

    python tests/frameworks/export_paddle.py FOLDER      (FOLDER/job.json, FOLDER/pixels.npy)
"""
from __future__ import annotations

import time
import warnings

import numpy as np

import common

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def main() -> None:
    import paddle
    import paddle2onnx
    from paddle.vision import transforms

    started = time.time()
    warnings.simplefilter("ignore")
    folder, case, pixels = common.job()
    paddle.seed(common.SEED)
    np.random.seed(common.SEED)
    # paddle's own ImageNet preprocessing: ToTensor (HWC uint8 -> CHW / 255) then Normalize
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean=MEAN, std=STD)])

    def preprocess(batch):
        return np.stack([np.asarray(transform(p)) for p in batch]).astype(np.float32)

    x = preprocess(pixels)
    common.check_preprocessing(x, pixels, case["preprocessing"], case["layout"])
    model = getattr(paddle.vision.models, case["model"])(pretrained=False)
    # BatchNorm statistics set from a batch: one training-mode pass with momentum 0
    norms = [l for l in model.sublayers() if isinstance(l, paddle.nn.layer.norm._BatchNormBase)]
    model.eval()
    for layer in norms:  # only BatchNorm in training mode: dropout stays off
        layer._momentum = 0.0
        layer.train()
    with paddle.no_grad():
        model(paddle.to_tensor(preprocess(common.calibration_pixels(pixels))))
    model.eval()

    def logits(batch):  # googlenet returns (main, aux1, aux2): the main classifier's logits
        out = model(paddle.to_tensor(batch))
        return (out[0] if isinstance(out, (tuple, list)) else out).numpy()

    # the classifier: the last Linear onto the 1000 classes, or (squeezenet) the last 1x1 Conv2D onto them
    head = [l for l in model.sublayers() if (isinstance(l, paddle.nn.Linear) and l.weight.shape[1] == 1000)
            or (isinstance(l, paddle.nn.Conv2D) and l.weight.shape[0] == 1000)][-1]
    with paddle.no_grad():
        scale = common.head_scale(logits(x))
        head.weight.set_value(head.weight * scale)
        head.bias.set_value(head.bias * scale)
        probs = common.softmax(logits(x))
    spec = [paddle.static.InputSpec(shape=[None, 3, *case["input_size"]], dtype="float32", name="x")]
    kwargs = {"opset_version": case["opset"]} if case["opset"] else {}
    paddle.onnx.export(model, str(folder / "model"), input_spec=spec, **kwargs)
    count = sum(int(np.prod(p.shape)) for p in model.parameters())
    notes = (f"paddle.vision.models.{case['model']}(pretrained=False) ({count / 1e6:.1f} M parameters); "
             f"paddle.onnx.export(input_spec=[None, 3, H, W]"
             + (f", opset_version={case['opset']})" if case["opset"] else ") at its default opset"))
    common.finish(folder, case, pixels, probs, framework_version=f"paddlepaddle {paddle.__version__}",
                  exporter_version=f"paddle2onnx {paddle2onnx.__version__}", outputs="logits", notes=notes,
                  started=started)


if __name__ == "__main__":
    main()
