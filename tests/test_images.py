import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from genderrec import images
from genderrec.images import ImageDecodeError
from tests.helpers.photos import png_with_declared_size


def encode(image, format_="JPEG", **options):
    buffer = io.BytesIO()
    image.save(buffer, format=format_, **options)
    return buffer.getvalue()


def test_real_celeba_face_decodes_to_rgb(celeba_dir):
    data = (celeba_dir / "img_align_celeba" / "000002.jpg").read_bytes()
    pixels = images.decode_image(data)
    assert pixels.shape == (218, 178, 3) and pixels.dtype == np.uint8
    resized = images.load_image(data, (64, 52))
    assert resized.shape == (64, 52, 3) and resized.dtype == np.float32
    assert resized.min() >= 0 and resized.max() <= 255 and resized.std() > 10


def test_grayscale_becomes_three_equal_channels():
    pixels = images.decode_image(encode(Image.new("L", (10, 12), 77), "PNG"))
    assert pixels.shape == (12, 10, 3) and (pixels == 77).all()


def test_cmyk_jpeg_converts_to_rgb():
    pixels = images.decode_image(encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0))))
    assert pixels.shape == (8, 8, 3)
    red, green, blue = pixels[4, 4].astype(int)
    assert red > 200 and green < 60 and blue < 60


def test_alpha_is_composited_on_white():
    transparent = Image.new("RGBA", (6, 6), (255, 0, 0, 0))
    assert (images.decode_image(encode(transparent, "PNG")) == 255).all()
    palette = Image.new("P", (6, 6), 0)
    palette.info["transparency"] = 0
    assert images.decode_image(encode(palette, "PNG", transparency=0)).shape == (6, 6, 3)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 10, 20))  # white strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90° clockwise turn
    pixels = images.decode_image(encode(image, exif=exif.tobytes()))
    assert pixels.shape == (40, 20, 3)
    assert pixels[:10].mean() > 200 and pixels[-10:].mean() < 50  # the white strip is now on top


def test_16_bit_grayscale_is_scaled():
    image = Image.fromarray(np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8))
    pixels = images.decode_image(encode(image, "PNG"))
    assert pixels.min() == 0 and pixels.max() == 255


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty file"),
        (b"hello, I am a text file", "not an image"),
        (encode(Image.new("RGB", (64, 64), (10, 20, 30)))[:200], "corrupt or truncated"),
    ],
)
def test_bad_bytes_raise_clear_errors(data, message):
    with pytest.raises(ImageDecodeError, match=message):
        images.decode_image(data)


def test_decompression_bomb_is_refused_before_decoding():
    with pytest.raises(ImageDecodeError, match=r"decompression bomb"):
        images.decode_image(png_with_declared_size(60_000, 60_000))
    with pytest.raises(ImageDecodeError, match=r"10000x5000 = 50 Mpx, over the limit of 40 Mpx"):
        images.decode_image(png_with_declared_size(10_000, 5_000))
    with pytest.raises(ImageDecodeError, match="over the limit of 1 Mpx"):
        images.decode_image(png_with_declared_size(2000, 1000), max_pixels=1_000_000)


def test_crop_box_then_resize():
    image = np.zeros((218, 178, 3), dtype=np.uint8)
    image[50:150, 40:140] = 255
    out = images.resize(image, (32, 32), crop_box=(40, 50, 140, 150))
    assert out.shape == (32, 32, 3) and out.min() == 255


def test_tf_dataset_decodes_with_the_shared_decoder(real_faces):
    uris = real_faces["image_uri"].head(5).tolist()
    dataset = images.tf_dataset(uris, [0, 1, 0, 1, 0], (40, 32), batch_size=5)
    batch, labels = next(iter(dataset))
    expected = np.stack([images.load_image(Path(uri).read_bytes(), (40, 32)) for uri in uris])
    np.testing.assert_array_equal(batch.numpy(), expected)
    assert labels.numpy().tolist() == [0, 1, 0, 1, 0]


def test_tf_dataset_names_the_bad_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    dataset = images.tf_dataset([str(bad)], [1], (40, 32), batch_size=1)
    with pytest.raises(Exception, match=r"broken.jpg: not an image"):
        next(iter(dataset))


def test_augmentation_changes_training_images_only():
    layer = images.augmentation(rotation_degrees=20, shift=0.2, zoom=0.0, horizontal_flip=True, seed=1)
    batch = np.random.default_rng(0).uniform(0, 255, (4, 40, 32, 3)).astype("float32")
    assert not np.allclose(np.asarray(layer(batch, training=True)), batch)
    np.testing.assert_array_equal(np.asarray(layer(batch, training=False)), batch)
    assert [type(sub).__name__ for sub in layer.layers] == ["RandomFlip", "RandomRotation", "RandomTranslation"]
    # every setting off: no augmentation, which the training input skips (an empty Sequential cannot be built)
    assert images.augmentation(rotation_degrees=0, shift=0, zoom=0, horizontal_flip=False) is None


def test_colour_and_blur_augmentation_keep_the_pixel_range():
    off = {"rotation_degrees": 0, "shift": 0, "zoom": 0, "horizontal_flip": False}
    layer = images.augmentation(**off, brightness=0.3, contrast=0.3, blur=1.0, seed=1)
    assert [type(sub).__name__ for sub in layer.layers] == ["RandomBrightness", "RandomContrast", "RandomGaussianBlur"]
    batch = np.random.default_rng(0).uniform(0, 255, (4, 40, 32, 3)).astype("float32")
    out = np.asarray(layer(batch, training=True))
    assert out.min() >= 0 and out.max() <= 255
    # blurred: neighbouring pixels of uniform noise move closer together
    assert np.abs(np.diff(out, axis=1)).mean() < 0.7 * np.abs(np.diff(batch, axis=1)).mean()
