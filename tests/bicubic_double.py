"""A test double for the ConsisSR pipeline: real bicubic ×4 (torch), with the pipeline's call protocol.

It stands in for the model where the code under test is the file handling around it (upscale,
demo), so that those tests run in seconds without a trained model.
"""

from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm


class BicubicTestDouble:
    scale = 4

    def __init__(self, training_info=None, steps=3):
        self.training_info = dict(training_info or {})
        self.calls = []
        self.steps = steps

    def _bicubic(self, image: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(image, np.float32)).permute(2, 0, 1)[None]
        y = F.interpolate(x, scale_factor=self.scale, mode="bicubic", align_corners=False)
        return y[0].permute(1, 2, 0).clamp(0, 1).numpy()

    def __call__(self, image, *, output_type="pil", num_inference_steps=None, **kwargs):
        self.calls.append({"num_inference_steps": num_inference_steps, **kwargs})
        if isinstance(image, Image.Image):
            image = np.asarray(image.convert("RGB"), np.float32) / 255
        assert image.dtype == np.float32 and image.ndim == 3 and image.shape[2] == 3
        for _ in tqdm(range(num_inference_steps or self.steps), desc="steps"):  # a per-step bar, as diffusers'
            pass
        out = self._bicubic(image)
        if output_type == "np":
            return SimpleNamespace(images=out[None])
        return SimpleNamespace(images=[Image.fromarray(np.rint(out * 255).astype(np.uint8))])

    def gan_upscale(self, image: np.ndarray) -> np.ndarray:
        return self._bicubic(image)
