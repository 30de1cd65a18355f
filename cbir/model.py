"""Backbones and inference: one forward pass gives class probabilities and retrieval features.

The only module that imports TensorFlow, Keras or OpenVINO, and only inside functions, so that
`cbir --help`, `cbir info` and the database code never pay for those imports.

Descriptor contract (rows, shape (n, d)): last conv block -> pooling (GAP as the original tool,
or GeM) -> L2-normalisation, so a dot product of two descriptors is their cosine similarity.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cbir import __version__
from cbir.errors import CbirError, WeightsMissing
from cbir.hashing import file_sha256

POOLINGS = ("gap", "gem")
GEM_P = 3.0
ENGINES = ("auto", "tensorflow", "openvino")
PRECISIONS = ("auto", "fp32", "bf16")
EMBEDDED_BACKBONE = "efficientnet_lite0"


@dataclass(frozen=True)
class Backbone:
    """Everything that must travel together for one backbone."""

    name: str
    input_size: int  # square input, pixels
    feature_dim: int  # channels of the last conv block = descriptor length
    preprocessing: str  # "tf": x/127.5-1, "caffe": BGR minus mean, "none": the model scales itself
    keras_constructor: str | None  # attribute of keras.applications; None: built by cbir
    weights_file: str  # ImageNet weights: Keras' cache file name, or the file shipped in cbir/data


BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone("inception_resnet_v2", 299, 1536, "tf", "InceptionResNetV2",
                 "inception_resnet_v2_weights_tf_dim_ordering_tf_kernels.h5"),
        Backbone("efficientnet_lite0", 224, 1280, "none", None,
                 "efficientnet_lite0_imagenet.weights.h5"),
        Backbone("resnet50", 224, 2048, "caffe", "ResNet50",
                 "resnet50_weights_tf_dim_ordering_tf_kernels.h5"),
        Backbone("xception", 299, 2048, "tf", "Xception",
                 "xception_weights_tf_dim_ordering_tf_kernels.h5"),
        Backbone("efficientnet_b0", 224, 1280, "none", "EfficientNetB0", "efficientnetb0.h5"),
    )
}  # fmt: skip
DEFAULT_BACKBONE = "inception_resnet_v2"


def get_backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise CbirError(f"unknown model {name!r}; choose one of: {', '.join(BACKBONES)}") from None


@dataclass(frozen=True)
class WeightsSpec:
    """Which weights to load: a file (or None for random init) and the identity the DB records."""

    path: Path | None
    identity: str  # "imagenet", "none" or "sha256:<hex>" of a user's file
    download: bool = False  # let Keras download ImageNet weights into its cache


def keras_cache_dir() -> Path:
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"


def resolve_weights(backbone: Backbone, weights: str) -> WeightsSpec:
    """Turn `--weights imagenet|none|FILE` into a WeightsSpec, without importing TensorFlow."""
    if weights == "none":
        return WeightsSpec(None, "none")
    if weights == "imagenet":
        if backbone.keras_constructor is None:
            shipped = resources.files("cbir").joinpath("data", backbone.weights_file)
            return WeightsSpec(Path(str(shipped)), "imagenet")
        cached = keras_cache_dir() / backbone.weights_file
        if cached.is_file():
            return WeightsSpec(cached, "imagenet")
        if os.environ.get("CBIR_OFFLINE"):
            raise WeightsMissing(_missing_weights_message(backbone, "CBIR_OFFLINE is set"))
        return WeightsSpec(None, "imagenet", download=True)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsMissing(f"weights file {path} does not exist")
    return WeightsSpec(path.resolve(), "sha256:" + file_sha256(path))


def _missing_weights_message(backbone: Backbone, why: str) -> str:
    return (
        f"ImageNet weights for {backbone.name} are not on this machine and could not be "
        f"downloaded ({why}). Keras wanted the file {backbone.weights_file} in "
        f"{keras_cache_dir()}: copy it there from a machine with network access, or pass "
        f"--weights FILE, or use --model {EMBEDDED_BACKBONE}, whose weights ship with cbir"
    )


@dataclass(frozen=True)
class Descriptions:
    """Model output for a batch of n images."""

    probs: npt.NDArray[np.float32]  # (n, 1000) softmax over ImageNet classes, output order
    features: dict[str, npt.NDArray[np.float32]]  # pooling -> (n, d), rows unit-norm


@dataclass
class Timings:
    """Seconds spent loading the model, for `cbir query --timings` and the benchmark."""

    import_s: float = 0.0
    build_s: float = 0.0
    weights_s: float = 0.0
    compile_s: float = 0.0


@dataclass
class Model:
    """A loaded backbone on one inference engine; `describe` runs one batch."""

    backbone: Backbone
    weights: WeightsSpec
    engine: str
    precision: str
    timings: Timings = field(default_factory=Timings)
    _run: Any = None  # callable: uint8 (n, s, s, 3) -> [probs, gap, gem] arrays

    def describe(self, images: npt.NDArray[np.uint8]) -> Descriptions:
        """images: (n, s, s, 3) uint8 RGB, s = backbone.input_size."""
        if len(images) == 0:
            d = self.backbone.feature_dim
            empty = np.zeros((0, d), np.float32)
            return Descriptions(np.zeros((0, 1000), np.float32), {p: empty for p in POOLINGS})
        probs, gap, gem = self._run(np.ascontiguousarray(images, dtype=np.uint8))
        return Descriptions(
            np.asarray(probs, np.float32),
            {"gap": np.asarray(gap, np.float32), "gem": np.asarray(gem, np.float32)},
        )

    def describe_in_batches(self, images: list[npt.NDArray[np.uint8]], batch: int) -> Descriptions:
        """`describe` of (s, s, 3) images, `batch` at a time: a forward pass's memory grows
        with its batch."""
        parts = [self.describe(np.stack(images[i : i + batch]))
                 for i in range(0, len(images), batch)]  # fmt: skip
        return Descriptions(
            np.concatenate([p.probs for p in parts]),
            {k: np.concatenate([p.features[k] for p in parts]) for k in POOLINGS},
        )


@lru_cache(maxsize=4)
def load_model(
    backbone_name: str, weights: str = "imagenet", engine: str = "auto", precision: str = "auto"
) -> Model:
    """Load once per process (memoised): in-process CLI calls and tests reuse the model."""
    backbone = get_backbone(backbone_name)
    spec = resolve_weights(backbone, weights)
    if engine not in ENGINES:
        raise CbirError(f"unknown engine {engine!r}; choose one of: {', '.join(ENGINES)}")
    if precision not in PRECISIONS:
        raise CbirError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    if engine == "auto":
        engine = (
            "openvino" if _openvino_available() and not _tensorflow_sees_gpu() else "tensorflow"
        )
    if engine == "openvino":
        return _load_openvino(backbone, spec, precision)
    return _load_tensorflow(backbone, spec, precision)


def _openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def _tensorflow_sees_gpu() -> bool:
    """A CUDA GPU is visible: TensorFlow will use it (checked without importing TensorFlow)."""
    return os.environ.get("CUDA_VISIBLE_DEVICES", "x") != "" and Path("/dev/nvidia0").exists()


def _import_keras() -> Any:
    """Import Keras on TensorFlow without TensorFlow's start-up chatter on the user's terminal."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    with _native_stderr_silenced():  # TF's C++ logs ignore TF_CPP_MIN_LOG_LEVEL at import
        import absl.logging
        import keras
        import tensorflow  # noqa: F401

    absl.logging.set_verbosity(absl.logging.ERROR)
    return keras


@contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null for the duration (Python exceptions still propagate)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def build_keras_model(backbone: Backbone, spec: WeightsSpec, timings: Timings) -> Any:
    """One Keras model: uint8 images in; [probs, GAP features, GeM features] out.

    Preprocessing is part of the graph, so every engine is fed the same uint8 batch.
    """
    t0 = time.perf_counter()
    keras = _import_keras()
    from keras import ops

    timings.import_s += time.perf_counter() - t0
    t0 = time.perf_counter()
    size = backbone.input_size
    inputs = keras.Input((size, size, 3), dtype="uint8", name="images")
    x = ops.cast(inputs, "float32")
    if backbone.preprocessing == "tf":
        x = x / 127.5 - 1.0
    elif backbone.preprocessing == "caffe":
        x = x[..., ::-1] - np.array([103.939, 116.779, 123.68], np.float32)
    if backbone.keras_constructor is None:
        from cbir.efficientnet_lite import EfficientNetLite

        base = EfficientNetLite("lite0", input_tensor=x)
    else:
        constructor = getattr(keras.applications, backbone.keras_constructor)
        base = constructor(weights=None, input_tensor=x)
    timings.build_s += time.perf_counter() - t0
    t0 = time.perf_counter()
    _load_weights(keras, base, backbone, spec)
    timings.weights_s += time.perf_counter() - t0
    conv = base.get_layer("avg_pool").input  # (n, h, w, d) last conv block
    probs = base.get_layer("predictions").output
    gap = ops.mean(conv, axis=(1, 2))
    gem = ops.power(ops.mean(ops.power(ops.maximum(conv, 1e-6), GEM_P), axis=(1, 2)), 1 / GEM_P)
    outputs = [probs, _l2_normalise(ops, gap), _l2_normalise(ops, gem)]
    return keras.Model(inputs, outputs, name=f"cbir_{backbone.name}")


def _l2_normalise(ops: Any, x: Any) -> Any:
    return x / ops.maximum(ops.sqrt(ops.sum(x * x, axis=-1, keepdims=True)), 1e-12)


def _load_weights(keras: Any, base: Any, backbone: Backbone, spec: WeightsSpec) -> None:
    path = spec.path
    if spec.download:
        origin = _keras_weights_origin(keras, backbone)
        try:
            path = Path(keras.utils.get_file(backbone.weights_file, origin, cache_subdir="models"))
        except Exception as exc:  # noqa: BLE001 - any download failure means "no weights here"
            raise WeightsMissing(
                _missing_weights_message(backbone, f"{type(exc).__name__}: {exc}")
            ) from exc
    if path is None:
        return
    try:
        base.load_weights(str(path))
    except (ValueError, OSError, KeyError) as exc:
        raise WeightsMissing(
            f"cannot load weights {path} into {backbone.name}: {type(exc).__name__}: {exc}"
        ) from exc


def _keras_weights_origin(keras: Any, backbone: Backbone) -> str:
    """The address Keras itself downloads this backbone's ImageNet weights from."""
    import importlib

    module_by_constructor = {
        "InceptionResNetV2": ("inception_resnet_v2", "BASE_WEIGHT_URL"),
        "ResNet50": ("resnet", "BASE_WEIGHTS_PATH"),
        "Xception": ("xception", "TF_WEIGHTS_PATH"),
        "EfficientNetB0": ("efficientnet", "BASE_WEIGHTS_PATH"),
    }
    module_name, attr = module_by_constructor[backbone.keras_constructor or ""]
    base = getattr(importlib.import_module(f"keras.src.applications.{module_name}"), attr)
    return base if base.endswith(".h5") else base + backbone.weights_file


def _load_tensorflow(backbone: Backbone, spec: WeightsSpec, precision: str) -> Model:
    if precision == "bf16":
        raise CbirError("--precision bf16 needs --engine openvino")
    timings = Timings()
    keras_model = build_keras_model(backbone, spec, timings)
    import tensorflow as tf

    size = backbone.input_size
    signature = [tf.TensorSpec([None, size, size, 3], tf.uint8)]
    run_graph = tf.function(lambda x: keras_model(x, training=False), input_signature=signature)

    def run(images: npt.NDArray[np.uint8]) -> list[npt.NDArray[np.float32]]:
        return [t.numpy() for t in run_graph(images)]

    return Model(backbone, spec, "tensorflow", "fp32", timings, run)


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cbir"
    return Path(os.environ.get("CBIR_CACHE_DIR", default))


def _load_openvino(backbone: Backbone, spec: WeightsSpec, precision: str) -> Model:
    """Convert the Keras model to OpenVINO once, cache the IR, compile for this CPU."""
    timings = Timings()
    t0 = time.perf_counter()
    import openvino as ov

    core = ov.Core()
    timings.import_s += time.perf_counter() - t0
    supports_bf16 = "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if precision == "auto":
        precision = "bf16" if supports_bf16 else "fp32"
    elif precision == "bf16" and not supports_bf16:
        raise CbirError("this CPU has no bf16 support; use --precision fp32")
    ir_path = cache_dir() / "openvino" / f"{_ir_key(backbone, spec, ov.__version__)}.xml"
    if not ir_path.is_file():
        keras_model = build_keras_model(backbone, spec, timings)
        t0 = time.perf_counter()
        import tensorflow as tf

        size = backbone.input_size
        signature = [tf.TensorSpec([None, size, size, 3], tf.uint8)]
        graph = tf.function(lambda x: keras_model(x, training=False), input_signature=signature)
        ov_model = ov.convert_model(graph.get_concrete_function())
        ir_path.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = ir_path.with_name(f".{ir_path.stem}.{os.getpid()}.xml")
        ov.save_model(ov_model, tmp_path, compress_to_fp16=False)
        os.replace(tmp_path.with_suffix(".bin"), ir_path.with_suffix(".bin"))
        os.replace(tmp_path, ir_path)  # the .xml last: its presence means the pair is complete
        timings.compile_s += time.perf_counter() - t0
    t0 = time.perf_counter()
    config = {
        "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
        "PERFORMANCE_HINT": "LATENCY",
        "CACHE_DIR": str(cache_dir() / "openvino" / "compiled"),
    }
    compiled = core.compile_model(str(ir_path), "CPU", config)
    timings.compile_s += time.perf_counter() - t0
    request = compiled.create_infer_request()
    outputs = compiled.outputs

    def run(images: npt.NDArray[np.uint8]) -> list[npt.NDArray[np.float32]]:
        result = request.infer({0: images})
        return [np.array(result[out]) for out in outputs]

    return Model(backbone, spec, "openvino", precision, timings, run)


def _ir_key(backbone: Backbone, spec: WeightsSpec, ov_version: str) -> str:
    """Cache key of a converted model: changes whenever the model or its weights could."""
    if spec.path is not None:
        stat = spec.path.stat()
        weights_id = f"{spec.path}:{stat.st_size}:{stat.st_mtime_ns}"
    else:
        weights_id = spec.identity
    text = f"{backbone}|{weights_id}|{GEM_P}|cbir {__version__}|openvino {ov_version}"
    return f"{backbone.name}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


# -- learning a query head from labels (cbir train) -------------------------------------------

HEAD_TEMPERATURE = 0.1
HEAD_BATCH = 128
HEAD_LEARNING_RATE = 1e-3
HEAD_STEPS = 1000  # gradient steps aimed at when the epochs are not given (at most 30 epochs)
HEAD_MAX_EPOCHS = 30
# Weight of ||A - I||^2 in the loss: keeps the head near the plain features, so classes never
# seen in training lose little. bench/train_head.py, one run on 2 cores, weights 0.003 / 0.01 /
# 0.03: unseen Fashion-MNIST 1k -0.010 / -0.006 / -0.004 mAP (the limit is 0.01), evaldata
# halves +0.063 / +0.060 / +0.059, Fashion-MNIST train -> test +0.159 / +0.129 / +0.090.
HEAD_ANCHOR = 0.01


def head_epochs(n_images: int) -> int:
    """Epochs that give about HEAD_STEPS steps of HEAD_BATCH images (5 to 30)."""
    steps_per_epoch = max(1, -(-n_images // HEAD_BATCH))
    return int(min(HEAD_MAX_EPOCHS, max(5, -(-HEAD_STEPS // steps_per_epoch))))


def train_query_head(
    centred: npt.NDArray[np.float32],
    classes: npt.NDArray[np.int64],
    epochs: int,
    on_epoch: Any = None,
    seed: int = 0,
    anchor: float = HEAD_ANCHOR,
) -> tuple[npt.NDArray[np.float32], list[float]]:
    """(head A (d, d), loss per epoch): a linear map of centred query features learned with a
    supervised contrastive loss (Khosla et al. 2020) on the user's labelled images.

    centred: (n, d) unit-norm features centred on the database's mean; classes: (n,) label of
    each, -1 for the database's own images taken as background (never a positive, never an
    anchor: what a query must rank the labelled images above). The logit of a pair (i, j) is
    normalise(A x_i) . x_j / HEAD_TEMPERATURE, which is how `cbir query` ranks with a head
    (cbir.centring): only the query side is mapped. A
    starts at the identity and anchor * ||A - I||^2 holds it near there. on_epoch(epoch,
    loss) is called after each epoch (a progress bar). Sets Keras' global random seed."""
    keras = _import_keras()
    from keras import ops

    keras.utils.set_random_seed(seed)
    n, d = centred.shape

    class TowardsIdentity(keras.regularizers.Regularizer):
        def __call__(self, w: Any) -> Any:
            return anchor * ops.sum(ops.square(w - ops.eye(d)))

    inputs = keras.Input((d,))
    head = keras.layers.Dense(d, use_bias=False, kernel_initializer="identity",
                              kernel_regularizer=TowardsIdentity())  # fmt: skip
    model = keras.Model(inputs, keras.layers.Concatenate()([head(inputs), inputs]))

    def contrastive(labels: Any, mapped_and_plain: Any) -> Any:
        mapped = _l2_normalise(ops, mapped_and_plain[:, :d])
        logits = ops.matmul(mapped, ops.transpose(mapped_and_plain[:, d:])) / HEAD_TEMPERATURE
        not_self = 1.0 - ops.eye(ops.shape(mapped)[0])
        labels = ops.reshape(ops.cast(labels, "int32"), (-1,))
        labelled = ops.cast(labels >= 0, "float32")
        same = ops.cast(ops.equal(labels[:, None], labels[None, :]), "float32") * not_self
        same = same * labelled[:, None] * labelled[None, :]
        logits = logits - 1e9 * (1.0 - not_self)
        log_prob = logits - ops.logsumexp(logits, axis=1, keepdims=True)
        positives = ops.sum(same, axis=1)
        per_anchor = ops.sum(same * log_prob, axis=1) / ops.maximum(positives, 1.0)
        anchors = ops.cast(positives > 0, "float32")
        return -ops.sum(per_anchor * anchors) / ops.maximum(ops.sum(anchors), 1.0)

    class Progress(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            if on_epoch is not None:
                on_epoch(epoch + 1, float((logs or {}).get("loss", float("nan"))))

    model.compile(optimizer=keras.optimizers.Adam(HEAD_LEARNING_RATE), loss=contrastive)
    history = model.fit(np.asarray(centred, np.float32), np.asarray(classes, np.int32),
                        batch_size=HEAD_BATCH, epochs=epochs, shuffle=True, verbose=0,
                        callbacks=[Progress()])  # fmt: skip
    # Dense computes x @ kernel: the head that maps a column vector is its transpose
    return head.get_weights()[0].T.astype(np.float32), [float(x) for x in history.history["loss"]]
