"""EfficientNet-Lite builder for Keras 3 (keras.applications has none).

Copied from the reference builder in shared/models (Apache-2.0, layer names match the converted
ImageNet weights shipped in cbir/data). Input: RGB float in [0, 255]; the model rescales it
itself as (x - 127) / 128. Imported only by cbir.model.
"""

import math

import keras
from keras import layers

# name: (width_coefficient, depth_coefficient, default_resolution, dropout_rate)
LITE_PARAMS = {
    "lite0": (1.0, 1.0, 224, 0.2),
    "lite1": (1.0, 1.1, 240, 0.2),
    "lite2": (1.1, 1.2, 260, 0.3),
    "lite3": (1.2, 1.4, 280, 0.3),
    "lite4": (1.4, 1.8, 300, 0.3),
}

# kernel, repeats, filters_in, filters_out, expand_ratio, stride
BLOCKS_ARGS = [
    (3, 1, 32, 16, 1, 1),
    (3, 2, 16, 24, 6, 2),
    (5, 2, 24, 40, 6, 2),
    (3, 3, 40, 80, 6, 2),
    (5, 3, 80, 112, 6, 1),
    (5, 4, 112, 192, 6, 2),
    (3, 1, 192, 320, 6, 1),
]

STEM_FILTERS = 32
HEAD_FILTERS = 1280
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99
DEPTH_DIVISOR = 8

# (x - MEAN) / STD, from the TF reference for the Lite models.
MEAN_RGB = 127.0
STDDEV_RGB = 128.0


def round_filters(filters, width_coefficient, divisor=DEPTH_DIVISOR):
    """Width scaling exactly as in the TF reference implementation."""
    filters *= width_coefficient
    new_filters = max(divisor, int(filters + divisor / 2) // divisor * divisor)
    if new_filters < 0.9 * filters:
        new_filters += divisor
    return int(new_filters)


def round_repeats(repeats, depth_coefficient):
    return int(math.ceil(depth_coefficient * repeats))


def _relu6(name):
    return layers.ReLU(max_value=6.0, name=name)


def _bn(name):
    return layers.BatchNormalization(axis=-1, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name)


def _mbconv(x, filters_in, filters_out, kernel_size, strides, expand_ratio, drop_rate, name):
    inputs = x
    filters = filters_in * expand_ratio
    if expand_ratio != 1:
        x = layers.Conv2D(filters, 1, padding="same", use_bias=False, name=name + "expand_conv")(x)
        x = _bn(name + "expand_bn")(x)
        x = _relu6(name + "expand_activation")(x)
    x = layers.DepthwiseConv2D(
        kernel_size,
        strides=strides,
        padding="same",
        use_bias=False,
        name=name + "dwconv",
    )(x)
    x = _bn(name + "bn")(x)
    x = _relu6(name + "activation")(x)
    x = layers.Conv2D(filters_out, 1, padding="same", use_bias=False, name=name + "project_conv")(x)
    x = _bn(name + "project_bn")(x)
    if strides == 1 and filters_in == filters_out:
        if drop_rate > 0:
            # Stochastic depth (only active in training), as in keras EfficientNet.
            x = layers.Dropout(drop_rate, noise_shape=(None, 1, 1, 1), name=name + "drop")(x)
        x = layers.add([x, inputs], name=name + "add")
    return x


def block_specs(variant):
    """List of per-block dicts (after width/depth scaling) for a variant."""
    width, depth, _, _ = LITE_PARAMS[variant]
    specs = []
    last = len(BLOCKS_ARGS) - 1
    for i, (k, r, f_in, f_out, e, s) in enumerate(BLOCKS_ARGS):
        f_in = STEM_FILTERS if i == 0 else round_filters(f_in, width)
        f_out = round_filters(f_out, width)
        reps = r if i in (0, last) else round_repeats(r, depth)
        for j in range(reps):
            specs.append(
                dict(
                    kernel_size=k,
                    filters_in=f_in if j == 0 else f_out,
                    filters_out=f_out,
                    expand_ratio=e,
                    strides=s if j == 0 else 1,
                    name=f"block{i + 1}{chr(j + 97)}_",
                )
            )
    return specs


def EfficientNetLite(
    variant="lite0",
    include_top=True,
    weights=None,
    input_tensor=None,
    input_shape=None,
    pooling=None,
    classes=1000,
    classifier_activation="softmax",
    include_preprocessing=True,
    drop_connect_rate=0.2,
    name=None,
):
    """Build an EfficientNet-Lite model (channels_last).

    ``weights`` is None or a path to a ``.weights.h5`` file of the full
    (include_top=True) model of the same variant; with include_top=False the
    backbone part of it is loaded.
    """
    if variant not in LITE_PARAMS:
        raise ValueError(f"variant must be one of {sorted(LITE_PARAMS)}")
    if keras.backend.image_data_format() != "channels_last":
        raise ValueError("EfficientNetLite supports channels_last only")
    if include_top and pooling is not None:
        raise ValueError("pooling is only used with include_top=False")
    width, depth, resolution, dropout_rate = LITE_PARAMS[variant]

    if input_shape is None:
        input_shape = (resolution, resolution, 3) if include_top else (None, None, 3)
    if input_tensor is None:
        img_input = layers.Input(shape=input_shape)
    elif not keras.backend.is_keras_tensor(input_tensor):
        img_input = layers.Input(tensor=input_tensor, shape=input_shape)
    else:
        img_input = input_tensor

    x = img_input
    if include_preprocessing:
        x = layers.Rescaling(
            scale=1.0 / STDDEV_RGB, offset=-MEAN_RGB / STDDEV_RGB, name="rescaling"
        )(x)

    x = layers.Conv2D(STEM_FILTERS, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(
        x
    )
    x = _bn("stem_bn")(x)
    x = _relu6("stem_activation")(x)

    specs = block_specs(variant)
    for idx, spec in enumerate(specs):
        x = _mbconv(x, drop_rate=drop_connect_rate * idx / len(specs), **spec)

    x = layers.Conv2D(HEAD_FILTERS, 1, padding="same", use_bias=False, name="top_conv")(x)
    x = _bn("top_bn")(x)
    x = _relu6("top_activation")(x)

    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        if dropout_rate > 0:
            x = layers.Dropout(dropout_rate, name="top_dropout")(x)
        x = layers.Dense(classes, activation=classifier_activation, name="predictions")(x)
    elif pooling == "avg":
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    elif pooling == "max":
        x = layers.GlobalMaxPooling2D(name="max_pool")(x)

    inputs = img_input
    if input_tensor is not None:
        inputs = keras.utils.get_source_inputs(input_tensor)
    model = keras.Model(inputs, x, name=name or "efficientnet" + variant.replace("lite", "_lite"))
    if weights is not None:
        if include_top:
            model.load_weights(weights)
        else:
            # Weight files hold the full classifier: load them into a full
            # model, then copy every layer present in this headless model.
            full = EfficientNetLite(
                variant,
                include_top=True,
                weights=weights,
                input_shape=(None, None, 3),
                include_preprocessing=include_preprocessing,
            )
            for layer in model.layers:
                if layer.weights:
                    layer.set_weights(full.get_layer(layer.name).get_weights())
    return model
