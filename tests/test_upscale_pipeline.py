"""`consissr upscale` end to end with the real (tiny, untrained) ConsisSRPipeline saved by save_pretrained.

The file handling's meaning (alpha ramps, gray, 16-bit, EXIF) is tested in test_upscale.py with a
bicubic test double; here the real pipeline's protocol is exercised through the command line."""

import numpy as np
import pytest
from PIL import Image
from test_inference import parts  # noqa: F401  (the tiny stage folders: backbone, net, robust CLIP, GAN)

from consissr import cli


@pytest.mark.slow  # ~90 s here: builds the tiny stage folders, saves and reloads the pipeline
def test_upscale_cli_with_the_real_tiny_pipeline(parts, tmp_path, capsys):  # noqa: F811
    from consissr.inference.pipeline import load_pipeline

    load_pipeline(None, device="cpu", stage_dirs=parts).save_pretrained(tmp_path / "model")
    rng = np.random.default_rng(0)
    rgba = np.dstack([rng.integers(0, 256, (20, 24, 3)), np.tile(np.linspace(0, 255, 24), (20, 1))]).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "in.png")
    (tmp_path / "bad.jpg").write_text("not an image")
    rc = cli.main(["upscale", str(tmp_path / "in.png"), str(tmp_path / "bad.jpg"), "-o", str(tmp_path / "out"),
                   "--model", str(tmp_path / "model"), "--device", "cpu", "--mode", "ganemb", "--steps", "2"])
    assert rc == 1 and "bad.jpg: not an image" in capsys.readouterr().err
    with Image.open(tmp_path / "out" / "in.png") as img:
        assert (img.mode, img.size) == ("RGBA", (96, 80))
        alpha = np.asarray(img)[..., 3].astype(int)
    # the alpha is the (random, untrained) GAN's upscale of the input alpha, re-attached
    gan = load_pipeline(tmp_path / "model", device="cpu").gan_upscale(np.repeat(rgba[..., 3:] / 255.0, 3, axis=2)
                                                                      .astype(np.float32))
    assert np.abs(alpha - np.rint(np.clip(gan.mean(axis=2), 0, 1) * 255)).max() <= 1
