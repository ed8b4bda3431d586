"""Bytes → RGB array, the one decoder used by training, labeling and serving.

Decoding with Pillow handles what real buckets hold: grayscale, CMYK, palette and alpha images,
EXIF orientation, and decompression bombs (refused before any pixel is decoded). Training,
labeling and serving all call :func:`load_image`, so a model never sees pixels prepared differently
from how it was trained. Architecture-specific preprocessing (``preprocess_input``) is not done here:
it is a layer inside every model (see :mod:`genderrec.models`).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from genderrec import storage

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
DEFAULT_MAX_PIXELS = 40_000_000


class ImageDecodeError(ValueError):
    """The bytes are not an image we can classify; the message says why."""


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode image bytes to an ``(height, width, 3)`` uint8 RGB array, upright per EXIF."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"image is {width}x{height} = {width * height / 1e6:.0f} Mpx, over the limit of "
                    f"{max_pixels / 1e6:.0f} Mpx (decompression bomb?)"
                )
            image.load()
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"decompression bomb refused: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, ImageDecodeError):
            raise
        raise ImageDecodeError(f"corrupt or truncated image: {exc}") from None
    return np.asarray(_to_rgb(ImageOps.exif_transpose(image)))


def _to_rgb(image: Image.Image) -> Image.Image:
    """Flatten alpha onto white and convert any mode (L, P, CMYK, I;16, …) to RGB."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        span = max(pixels.max() - pixels.min(), 1e-9)
        image = Image.fromarray(((pixels - pixels.min()) / span * 255).astype(np.uint8))
    return image.convert("RGB")


def resize(pixels: np.ndarray, size: tuple[int, int], crop_box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Crop (``left, top, right, bottom`` in source pixels) then resize to ``(height, width)``, float32."""
    image = Image.fromarray(pixels)
    if crop_box is not None:
        image = image.crop(crop_box)
    height, width = size
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float32)


def load_image(
    data: bytes,
    size: tuple[int, int],
    crop_box: tuple[int, int, int, int] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Bytes → model input: ``(height, width, 3)`` float32 RGB in 0..255."""
    return resize(decode_image(data, max_pixels=max_pixels), size, crop_box)


def augmentation(
    rotation_degrees: float,
    shift: float,
    zoom: float,
    horizontal_flip: bool,
    brightness: float = 0.0,
    contrast: float = 0.0,
    blur: float = 0.0,
    seed: int | None = None,
):
    """The notebook's ImageDataGenerator augmentation (and :class:`~genderrec.config.AugmentConfig`'s colour and
    blur), as Keras preprocessing layers on 0..255 pixels; ``None`` when every setting is off (Keras cannot build
    an empty ``Sequential``).

    Always float32 pixels in and out: under a mixed ``training.precision`` they would otherwise compute in 16 bits.
    """
    import keras

    common = {"fill_mode": "nearest", "seed": seed, "dtype": "float32"}
    layers = []
    if horizontal_flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed, dtype="float32"))
    if rotation_degrees:
        layers.append(keras.layers.RandomRotation(rotation_degrees / 360.0, **common))
    if shift:
        layers.append(keras.layers.RandomTranslation(shift, shift, **common))
    if zoom:
        layers.append(keras.layers.RandomZoom(zoom, **common))
    colour = {"value_range": (0, 255), "seed": seed, "dtype": "float32"}
    if brightness:
        layers.append(keras.layers.RandomBrightness(brightness, **colour))
    if contrast:
        layers.append(keras.layers.RandomContrast(contrast, **colour))
    if blur:
        layers.append(keras.layers.RandomGaussianBlur((blur, blur), kernel_size=5, sigma=(0.5, 1.5), **colour))
    return keras.Sequential(layers, name="augmentation") if layers else None


def tf_dataset(
    uris,
    labels,
    image_size: tuple[int, int],
    batch_size: int,
    *,
    crop_box=None,
    training: bool = False,
    augment=None,
    cache: bool = True,
    repeat: bool = False,
    seed: int = 0,
):
    """A tf.data pipeline: parallel read+decode+resize (the shared decoder), cache, shuffle, batch, augment, prefetch."""
    import tensorflow as tf

    height, width = image_size

    def load(uri):
        uri = uri.decode()
        try:
            return load_image(storage.read_bytes(uri), image_size, crop_box)
        except Exception as exc:
            raise ValueError(f"{uri}: {exc}") from exc

    def load_tensor(uri, label):
        pixels = tf.numpy_function(load, [uri], tf.float32, stateful=False)
        pixels.set_shape((height, width, 3))
        return pixels, label

    uris = np.asarray(list(uris), dtype=object).astype(str)
    labels = np.asarray(list(labels), dtype=np.float32)
    dataset = tf.data.Dataset.from_tensor_slices((uris, labels))
    if training and not cache:
        dataset = dataset.shuffle(len(uris), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.map(load_tensor, num_parallel_calls=tf.data.AUTOTUNE, deterministic=not training)
    if cache:
        dataset = dataset.cache()
    if training and cache:
        dataset = dataset.shuffle(len(uris), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()
    dataset = dataset.batch(batch_size)
    if training and augment is not None:
        dataset = dataset.map(lambda x, y: (augment(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)
