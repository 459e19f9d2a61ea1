"""The bundled model: loads offline, and a classifier trained on the real digits recognises its samples."""
import numpy as np
import pytest
import torch

from compactfusion.bundled.digits import load_digits_pipeline, pack, parse_label, unpack
from compactfusion.bundled.digits_data import digit_accuracy


@pytest.fixture(scope="module")
def pipe():
    p = load_digits_pipeline()
    p.set_progress_bar_config(disable=True)
    return p


def test_quality_bar_100_samples(pipe):
    labels = [i % 10 for i in range(100)]
    images = pipe(labels, num_inference_steps=12, generator=torch.Generator().manual_seed(123), output_type="np").images
    assert images.shape == (100, 32, 32, 1)
    acc = digit_accuracy(images, labels)
    assert acc >= 0.95, f"bundled model: only {acc:.0%} of 100 samples classified as the asked digit"


def test_same_seed_same_image_and_pil_output(pipe):
    a = pipe(3, num_inference_steps=4, generator=torch.Generator().manual_seed(5), output_type="np").images
    b = pipe("3", num_inference_steps=4, generator=torch.Generator().manual_seed(5), output_type="np").images
    assert np.array_equal(a, b)
    img = pipe("a 3", num_inference_steps=2, generator=torch.Generator().manual_seed(5)).images[0]
    assert img.size == (32, 32)


def test_pack_unpack_roundtrip_and_prompt_parsing():
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(unpack(pack(x), 32, 32), x)
    assert parse_label("7") == 7 and parse_label(0) == 0
    for bad in ("12", "x", 11, -1):
        with pytest.raises(ValueError, match="digit"):
            parse_label(bad)
    with pytest.raises(TypeError):
        parse_label(3.5)
