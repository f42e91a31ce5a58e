"""``consissr demo``: a Gradio page over the same upscaler as ``consissr upscale``.

Upload, the sampling knobs (mode: full, ganemb or the GAN alone; steps, t_max, prompt, seed), a before/after slider (the input
resized bicubically to the output size | the model's output), the full-precision PNG to download,
progress from the pipeline's tqdm bars, and the briefly-trained-model warning as a banner.
Bound to 127.0.0.1 unless ``host`` says otherwise.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from consissr.data.images import DEFAULT_MAX_PIXELS, ImageError, read_image
from consissr.inference.upscale import UpscaleOptions, Upscaler, training_warning, upscale_image, write_png

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local demo


def _display(pixels: np.ndarray) -> Image.Image:
    """8-bit PIL view of H×W×C pixels (uint8 or uint16), for the browser."""
    if pixels.dtype == np.uint16:
        pixels = ((pixels.astype(np.uint32) * 2 + 257) // 514).astype(np.uint8)
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[pixels.shape[2]]
    return Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)


def build_demo(pipe: Upscaler, *, max_pixels: int = DEFAULT_MAX_PIXELS):
    import gradio as gr

    warning = training_warning(getattr(pipe, "training_info", {}) or {}, gan_hint="choose the **gan** mode")
    default_mode = getattr(getattr(pipe, "defaults", None), "mode", "full")
    out_dir = Path(tempfile.mkdtemp(prefix="consissr-demo-"))

    def run(path: str | None, mode: str, steps: float | None, t_max: float | None, prompt: str, seed: float | None,
            progress=gr.Progress(track_tqdm=True)) -> tuple[Any, Any, str]:  # noqa: B008 (Gradio's idiom)
        if not path:
            raise gr.Error("upload an image first")
        try:
            image = read_image(path, max_pixels=max_pixels)
        except ImageError as exc:
            raise gr.Error(exc.reason) from None
        diffusion = mode != "gan"  # the GAN alone takes no steps, t_max or prompt
        options = UpscaleOptions(mode=mode, num_inference_steps=int(steps) if steps and diffusion else None,
                                 t_max=int(t_max) if t_max and diffusion else None,
                                 prompt=(prompt or None) if diffusion else None,
                                 seed=int(seed) if seed is not None and diffusion else None)
        pixels = upscale_image(pipe, image, options)
        result = _display(pixels)
        before = _display(image.pixels).resize(result.size, Image.Resampling.BICUBIC)
        target = out_dir / f"{Path(path).stem}_x{pipe.scale}.png"
        write_png(target, pixels)
        return (before, result), result, str(target)

    with gr.Blocks(title="ConsisSR") as demo:
        gr.Markdown(f"## ConsisSR ×{pipe.scale} super-resolution")
        if warning:
            gr.Markdown(f"**Warning:** {warning}", elem_id="training-warning")
        with gr.Row():
            with gr.Column():
                source = gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard"], format="png",
                                  label="Low-resolution image", elem_id="input")
                mode = gr.Radio(["full", "ganemb", "gan"], value=default_mode, elem_id="mode",
                                label="Mode (§3.1 full | Algorithm 2 GAN-Embedding | gan: Real-ESRGAN x4plus alone)")
                # 0 or empty: the pipeline's default for the mode (full 50; GANEmb preset rec: 10 from 600)
                steps = gr.Number(value=None, precision=0, label="Steps (0: the mode's default)")
                t_max = gr.Number(value=None, precision=0, maximum=1000, label="t_max, GAN-Embedding (0: preset rec)")
                prompt = gr.Textbox(value="", label="Prompt")
                seed = gr.Number(value=0, precision=0, label="Seed")
                button = gr.Button("Upscale", variant="primary", elem_id="run")
            with gr.Column():
                slider = gr.ImageSlider(type="pil", format="png", label="Before (bicubic) | after",
                                        elem_id="before-after")
                result = gr.Image(type="pil", format="png", label="Result", interactive=False, elem_id="output")
                download = gr.File(label="Full-precision PNG", elem_id="download")
        button.click(run, [source, mode, steps, t_max, prompt, seed], [slider, result, download])
    return demo


def launch(pipe: Upscaler, *, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    import gradio as gr

    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # no web fonts: works offline
    demo = build_demo(pipe)
    demo.queue().launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block,
                        theme=theme, footer_links=[], quiet=not block)
    return demo
