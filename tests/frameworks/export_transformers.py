"""Hugging Face transformers image classifiers built from configurations (no hub access), exported
with torch.onnx: the legacy exporter (``dynamo=False``, opset 17) or the dynamo exporter (its default
opset, weights in ``model.onnx.data``). Runs in the main venv (transformers needs torch).

    python tests/frameworks/export_transformers.py FOLDER      (FOLDER/job.json, FOLDER/pixels.npy)

The configurations are typed in from the published checkpoints' config.json files (vit:base,
convnext:tiny, swin:tiny, mobilevit:small and :xx-small, resnet:50 and :18) or shrunk from them
(``mini``: the same layer types, fewer and narrower blocks).
"""
from __future__ import annotations

import time
import warnings

import numpy as np

import common

CONFIGS = {
    # google/vit-base-patch16-224
    "vit:base": ("ViT", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                  intermediate_size=3072, image_size=224, patch_size=16, hidden_act="gelu",
                                  layer_norm_eps=1e-12, qkv_bias=True)),
    "vit:mini": ("ViT", dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768,
                              image_size=224, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-12,
                              qkv_bias=True)),
    # facebook/convnext-tiny-224 (layer_scale_init_value 1e-6 there: a training initialisation that
    # silences every block of an untrained model; 0.1 here so that the blocks count)
    "convnext:tiny": ("ConvNext", dict(depths=[3, 3, 9, 3], hidden_sizes=[96, 192, 384, 768], patch_size=4,
                                            num_stages=4, hidden_act="gelu", layer_scale_init_value=0.1,
                                            drop_path_rate=0.0, image_size=224)),
    "convnext:mini": ("ConvNext", dict(depths=[1, 1, 3, 1], hidden_sizes=[40, 80, 160, 320], patch_size=4,
                                        num_stages=4, hidden_act="gelu", layer_scale_init_value=0.1,
                                        drop_path_rate=0.0, image_size=224)),
    # microsoft/swin-tiny-patch4-window7-224
    "swin:tiny": ("Swin", dict(image_size=224, patch_size=4, embed_dim=96, depths=[2, 2, 6, 2],
                                    num_heads=[3, 6, 12, 24], window_size=7, mlp_ratio=4.0, qkv_bias=True,
                                    drop_path_rate=0.1, hidden_act="gelu", use_absolute_embeddings=False)),
    "swin:mini": ("Swin", dict(image_size=224, patch_size=4, embed_dim=32, depths=[1, 1, 2, 1],
                                num_heads=[1, 2, 4, 8], window_size=7, mlp_ratio=4.0, qkv_bias=True,
                                drop_path_rate=0.1, hidden_act="gelu", use_absolute_embeddings=False)),
    # apple/mobilevit-small
    "mobilevit:small": ("MobileViT", dict(image_size=256, patch_size=2, hidden_sizes=[144, 192, 240],
                                              neck_hidden_sizes=[16, 32, 64, 96, 128, 160, 640], num_attention_heads=4,
                                              mlp_ratio=2.0, expand_ratio=4.0, hidden_act="silu", conv_kernel_size=3,
                                              output_stride=32)),
    # apple/mobilevit-xx-small
    "mobilevit:xx-small": ("MobileViT", dict(image_size=256, patch_size=2, hidden_sizes=[64, 80, 96],
                                          neck_hidden_sizes=[16, 16, 24, 48, 64, 80, 320], num_attention_heads=4,
                                          mlp_ratio=2.0, expand_ratio=2.0, hidden_act="silu", conv_kernel_size=3,
                                          output_stride=32)),
    # microsoft/resnet-50
    "resnet:50": ("ResNet", dict(embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], depths=[3, 4, 6, 3],
                                        layer_type="bottleneck", hidden_act="relu", downsample_in_first_stage=False)),
    # microsoft/resnet-18
    "resnet:18": ("ResNet", dict(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2],
                                    layer_type="basic", hidden_act="relu", downsample_in_first_stage=False)),
    # google/mobilenet_v2_1.0_224: TensorFlow's SAME padding computed in torch (tf_padding), 1001 classes
    "mobilenetv2:1.0": ("MobileNetV2", dict(depth_multiplier=1.0, image_size=224, tf_padding=True,
                                            hidden_act="relu6", num_labels=1001)),
    # facebook/levit-128S: attention biases, Linear+BatchNorm blocks, the two heads of the distilled model
    "levit:128S": ("Levit", dict(image_size=224, patch_size=16, hidden_sizes=[128, 256, 384],
                                 num_attention_heads=[4, 6, 8], depths=[2, 3, 4], key_dim=[16, 16, 16],
                                 drop_path_rate=0, mlp_ratio=[2, 2, 2], attention_ratio=[2, 2, 2]),
                   "LevitForImageClassificationWithTeacher"),
    # facebook/dinov2-small (518 px position table, interpolated to the 224 px input in the graph)
    "dinov2:small": ("Dinov2", dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4,
                                    image_size=518, patch_size=14, layerscale_value=1.0)),
    # BEiT shrunk: relative position bias per layer, layer scale, mean pooling
    "beit:mini": ("Beit", dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768,
                               image_size=224, patch_size=16, use_relative_position_bias=True,
                               use_mean_pooling=True, layer_scale_init_value=0.1)),
    # the sweep subset (cases.py): published configurations, or shrunk (``mini``) where marked
    # Data2Vec-vision shrunk as BEiT (data2vec-vision-base-ft1k: relative position bias, mean pooling)
    "data2vec-vision:mini": ("Data2VecVision", dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=3,
                                                    intermediate_size=768, image_size=224, patch_size=16,
                                                    use_relative_position_bias=True, use_mean_pooling=True,
                                                    layer_scale_init_value=0.1)),
    # apple/mobilevitv2-1.0-imagenet1k-256 (separable linear attention)
    "mobilevitv2:1.0": ("MobileViTV2", dict(image_size=256, patch_size=2, width_multiplier=1.0, hidden_act="swish",
                                            conv_kernel_size=3, output_stride=32, expand_ratio=2.0)),
    # sail/poolformer_s12
    "poolformer:s12": ("PoolFormer", dict(depths=[2, 2, 6, 2], hidden_sizes=[64, 128, 320, 512], pool_size=3,
                                          mlp_ratio=4.0, patch_sizes=[7, 3, 3, 3], strides=[4, 2, 2, 2],
                                          padding=[2, 1, 1, 1], layer_scale_init_value=0.1,
                                          hidden_act="gelu", drop_path_rate=0.0)),
    # facebook/deit-tiny-distilled-patch16-224 (class and distillation tokens, two heads averaged)
    "deit:tiny-distilled": ("DeiT", dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3,
                                         intermediate_size=768, image_size=224, patch_size=16, qkv_bias=True,
                                         layer_norm_eps=1e-12), "DeiTForImageClassificationWithTeacher"),
    # google/efficientnet-b0 (TF SAME padding computed in torch)
    "efficientnet:b0": ("EfficientNet", dict(image_size=224, width_coefficient=1.0, depth_coefficient=1.0,
                                             dropout_rate=0.2, hidden_dim=1280, depthwise_padding=[])),
    # facebook/regnet-x-002 (RegNetConfig's defaults are regnet-y-040)
    "regnet:x-002": ("RegNet", dict(embedding_size=32, hidden_sizes=[24, 56, 152, 368], depths=[1, 1, 4, 7],
                                    groups_width=8, layer_type="x", hidden_act="relu")),
    # google/bit-50 (weight-standardised convs, TF SAME dynamic padding, pre-activation)
    "bit:50": ("Bit", dict(layer_type="preactivation", global_padding="SAME", embedding_dynamic_padding=True,
                           depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048], embedding_size=64)),
    # facebook/convnextv2-atto-1k-224 (global response normalisation)
    "convnextv2:atto": ("ConvNextV2", dict(depths=[2, 2, 6, 2], hidden_sizes=[40, 80, 160, 320], patch_size=4,
                                           num_stages=4, hidden_act="gelu", drop_path_rate=0.0, image_size=224)),
    # microsoft/focalnet-tiny (focal modulation)
    "focalnet:tiny": ("FocalNet", dict(embed_dim=96, depths=[2, 2, 6, 2], focal_levels=[2, 2, 2, 2],
                                       focal_windows=[3, 3, 3, 3], image_size=224, patch_size=4, mlp_ratio=4.0,
                                       drop_path_rate=0.0, use_layerscale=False, normalize_modulator=False)),
    # Zetatech/pvt-tiny-224 (spatial-reduction attention, position embeddings)
    "pvt:tiny": ("Pvt", dict(image_size=224, num_encoder_blocks=4, depths=[2, 2, 2, 2], sequence_reduction_ratios=[8, 4, 2, 1],
                             hidden_sizes=[64, 128, 320, 512], patch_sizes=[4, 2, 2, 2], strides=[4, 2, 2, 2],
                             num_attention_heads=[1, 2, 5, 8], mlp_ratios=[8, 8, 4, 4])),
    # OpenGVLab/pvt_v2_b0 (overlapping patch embedding, depthwise conv in the MLP)
    "pvtv2:b0": ("PvtV2", dict(image_size=224, num_encoder_blocks=4, depths=[2, 2, 2, 2], sr_ratios=[8, 4, 2, 1],
                               hidden_sizes=[32, 64, 160, 256], patch_sizes=[7, 3, 3, 3], strides=[4, 2, 2, 2],
                               num_attention_heads=[1, 2, 5, 8], mlp_ratios=[8, 8, 4, 4])),
    # MBZUAI/swiftformer-xs (efficient additive attention; a head and a distillation head averaged)
    "swiftformer:xs": ("SwiftFormer", dict(image_size=224, num_channels=3, depths=[3, 3, 6, 4],
                                           embed_dims=[48, 56, 112, 220], mlp_ratio=4, downsamples=[True] * 4,
                                           hidden_act="gelu", down_patch_size=3, down_stride=2, down_pad=1,
                                           drop_path_rate=0.0, use_layer_scale=True, layer_scale_init_value=0.1)),
    # facebook/hiera-tiny-224-hf (mask-unit attention, unroll/reroll reshapes)
    "hiera:tiny": ("Hiera", dict(embed_dim=96, image_size=[224, 224], patch_size=[7, 7], patch_stride=[4, 4],
                                 patch_padding=[3, 3], depths=[1, 2, 7, 2], num_heads=[1, 2, 4, 8],
                                 embed_dim_multiplier=2.0, num_query_pool=2, query_stride=[2, 2],
                                 masked_unit_size=[8, 8], masked_unit_attention=[True, True, False, False],
                                 drop_path_rate=0.0)),
    # HGNetV2Config's defaults (ustc-community/hgnet-v2 B4-like: learnable affine blocks, light blocks)
    "hgnetv2:default": ("HGNetV2", dict()),
    # facebook/dinov2-with-registers-small (4 register tokens)
    "dinov2reg:small": ("Dinov2WithRegisters", dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                                    mlp_ratio=4, image_size=518, patch_size=14,
                                                    layerscale_value=1.0, num_register_tokens=4)),
}


def processor(family: str):
    """The family's image processor as its checkpoints configure it, resizing and cropping off (the
    pixels already have the network's size)."""
    import transformers as hf

    imagenet = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    if family == "vit":  # google/vit-base-patch16-224
        return hf.ViTImageProcessor(do_resize=False, do_rescale=True, do_normalize=True,
                                    image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    if family == "swin":  # microsoft/swin-tiny-patch4-window7-224 uses ViTImageProcessor
        return hf.ViTImageProcessor(do_resize=False, do_rescale=True, do_normalize=True, **imagenet)
    if family in ("convnext", "resnet"):  # both ship ConvNextImageProcessor
        return hf.ConvNextImageProcessor(do_resize=False, do_rescale=True, do_normalize=True, **imagenet)
    if family == "mobilevit":  # rescale and flip to BGR, no normalisation
        return hf.MobileViTImageProcessor(do_resize=False, do_center_crop=False, do_rescale=True,
                                          do_flip_channel_order=True, do_normalize=False)
    if family == "mobilenetv2":  # google/mobilenet_v2_1.0_224
        return hf.MobileNetV2ImageProcessor(do_resize=False, do_center_crop=False, do_rescale=True,
                                            do_normalize=True, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    if family == "levit":
        return hf.LevitImageProcessor(do_resize=False, do_center_crop=False, do_rescale=True, do_normalize=True,
                                      **imagenet)
    if family == "dinov2":  # facebook/dinov2-small ships BitImageProcessor
        return hf.BitImageProcessor(do_resize=False, do_center_crop=False, do_rescale=True, do_normalize=True,
                                    do_convert_rgb=True, **imagenet)
    if family == "beit":  # microsoft/beit-base-patch16-224: mean = std = 0.5
        return hf.BeitImageProcessor(do_resize=False, do_center_crop=False, do_rescale=True, do_normalize=True,
                                     image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    # the sweep subset
    if family == "data2vec-vision":  # facebook/data2vec-vision-base-ft1k: BeitImageProcessor, mean = std = 0.5
        return hf.BeitImageProcessor(do_resize=False, do_center_crop=False, do_rescale=True, do_normalize=True,
                                     image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    if family == "mobilevitv2":  # as MobileViT: x/255 and BGR
        return hf.MobileViTImageProcessor(do_resize=False, do_center_crop=False, do_rescale=True,
                                          do_flip_channel_order=True, do_normalize=False)
    if family == "poolformer":
        return hf.PoolFormerImageProcessor(do_resize=False, do_center_crop=False, do_rescale=True,
                                           do_normalize=True, **imagenet)
    if family == "deit":
        return hf.DeiTImageProcessor(do_resize=False, do_center_crop=False, do_rescale=True, do_normalize=True,
                                     **imagenet)
    if family == "efficientnet":  # google/efficientnet-b0: std = sqrt(ImageNet std), applied twice (include_top)
        return hf.EfficientNetImageProcessor(do_resize=False, do_center_crop=False, do_rescale=True,
                                             do_normalize=True, include_top=True, rescale_offset=False,
                                             image_mean=[0.485, 0.456, 0.406],
                                             image_std=[0.47853944, 0.4732864, 0.47434163])
    if family in ("regnet", "convnextv2"):  # ConvNextImageProcessor
        return hf.ConvNextImageProcessor(do_resize=False, do_rescale=True, do_normalize=True, **imagenet)
    if family == "bit":  # google/bit-50: BitImageProcessor, mean = std = 0.5
        return hf.BitImageProcessor(do_resize=False, do_center_crop=False, do_rescale=True, do_normalize=True,
                                    do_convert_rgb=True, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    if family in ("focalnet", "dinov2"):  # BitImageProcessor with ImageNet statistics
        return hf.BitImageProcessor(do_resize=False, do_center_crop=False, do_rescale=True, do_normalize=True,
                                    do_convert_rgb=True, **imagenet)
    if family in ("pvt", "pvtv2"):
        return hf.PvtImageProcessor(do_resize=False, do_rescale=True, do_normalize=True, **imagenet)
    if family in ("hiera", "dinov2reg"):  # BitImageProcessor, ImageNet statistics
        return hf.BitImageProcessor(do_resize=False, do_center_crop=False, do_rescale=True, do_normalize=True,
                                    do_convert_rgb=True, **imagenet)
    if family == "hgnetv2":
        return hf.ConvNextImageProcessor(do_resize=False, do_rescale=True, do_normalize=True, **imagenet)
    if family == "swiftformer":  # MBZUAI/swiftformer-xs: ViTImageProcessor, ImageNet statistics
        return hf.ViTImageProcessor(do_resize=False, do_rescale=True, do_normalize=True, **imagenet)
    raise KeyError(family)


class Logits(__import__("torch").nn.Module):
    """What users export: the model's ``.logits`` as the one output."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).logits


def build(recipe: str, calibration, photos):
    """The seeded model (eval mode): BatchNorm statistics set from ``calibration``, the classifier
    rescaled so that the logits on ``photos`` have a standard deviation of 3."""
    import torch
    import transformers as hf

    kind, kwargs, *head_class = CONFIGS[recipe]
    kwargs = {"num_labels": 1000, **kwargs}
    config = getattr(hf, f"{kind}Config")(**kwargs)
    torch.manual_seed(common.SEED)
    model = Logits(getattr(hf, head_class[0] if head_class else f"{kind}ForImageClassification")(config))
    model.eval()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if norms:
        for m in norms:
            if kind == "EfficientNet":
                # transformers draws EfficientNet's BatchNorm scales from N(0, 0.02): with its eps of 1e-3 each
                # block shrinks the signal (logits about 1e-19 on the photographs, every map constant); the
                # scales at 1, torch's own initialisation, as a checkpoint's are of order 1
                torch.nn.init.ones_(m.weight)
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: one pass sets the batch's statistics
            m.train()  # only BatchNorm in training mode: dropout and drop path stay off
        with torch.no_grad():
            model(calibration)
    model.eval()
    # the classifier (LeViT's distilled model has two, averaged): every Linear onto the classes
    heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == config.num_labels]
    with torch.no_grad():
        scale = common.head_scale(model(photos).numpy())
        for head in heads:
            head.weight.mul_(scale)
            if head.bias is not None:
                head.bias.mul_(scale)
    return model


def main() -> None:
    import torch
    import transformers

    started = time.time()
    folder, case, pixels = common.job()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    family = case["model"].split(":")[0]
    proc = processor(family)

    def prepare(images):
        return proc(images=list(images), return_tensors="pt")["pixel_values"].float()

    x = prepare(pixels)
    common.check_preprocessing(x.numpy(), pixels, case["preprocessing"], case["layout"])
    model = build(case["model"], prepare(common.calibration_pixels(pixels)), x)
    with torch.no_grad():
        probs = common.softmax(model(x).numpy())
    path = folder / "model.onnx"
    example = x[:1]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if case["exporter"].endswith("legacy"):
            torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=case["opset"],
                              input_names=["pixel_values"], output_names=["logits"])
        else:
            program = torch.onnx.export(model, (example,), dynamo=True, verbose=False)
            program.save(str(path), external_data=True)
    kind, kwargs, *head_class = CONFIGS[case["model"]]
    settings = ", ".join(f"{k}={v}" for k, v in {"num_labels": 1000, **kwargs}.items())
    notes = (f"{head_class[0] if head_class else kind + 'ForImageClassification'}({kind}Config({settings})); "
             f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")
    common.finish(folder, case, pixels, probs, framework_version=f"transformers {transformers.__version__}, "
                  f"torch {torch.__version__}", exporter_version=f"torch {torch.__version__}",
                  outputs="logits", notes=notes, started=started)


if __name__ == "__main__":
    main()
