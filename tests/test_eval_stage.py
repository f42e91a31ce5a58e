"""Stage `evaluate` orchestration over a contract-shaped pipeline: files, schema, one pipeline load, MLflow."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from consissr.config import DegradeParams, EvalDatasetParams, EvaluateParams, InferenceParams
from consissr.evaluation.report import validate_metrics
from consissr.evaluation.stage import bicubic, evaluate, method_settings


class ContractPipeline:
    """Stands in for ConsisSRPipeline (contracts.md item 3): same call signature, records each call;
    its 'restoration' is bicubic plus a t_max- and steps-dependent tint, so each setting differs."""

    def __init__(self):
        self.calls = []

    def __call__(self, image, *, mode, t_max=None, num_inference_steps=None, seed=None, output_type="pil", **kw):
        assert isinstance(image, np.ndarray) and image.dtype == np.float32 and output_type == "np"
        self.calls.append((mode, t_max, num_inference_steps, seed))
        tint = (t_max or 0) / 20000 + num_inference_steps / 1000
        return SimpleNamespace(images=np.clip(bicubic(image, 4) + tint, 0, 1)[None])

    def gan_upscale(self, image):
        return np.repeat(np.repeat(image, 4, axis=0), 4, axis=1)


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def test_evaluate_writes_tables_plots_grids_and_one_run(tmp_path, mlflow_uri):
    ev = EvaluateParams(datasets=(EvalDatasetParams(name="embedded", kind="embedded", count=2),), lr_crop=24,
                        full_steps=3, rec_steps=2, gen_steps=2, sweep_t_max=(600, 1000), sweep_steps=(2, 3),
                        metrics=("psnr", "ssim", "niqe", "lpips"), weights_dir=str(tmp_path / "no_weights"),
                        sweep_nr_metric="ssim", grid_images=1)
    (tmp_path / "no_weights").mkdir()
    pipe, loads = ContractPipeline(), []

    def load():
        loads.append(1)
        return pipe

    out = {k: tmp_path / k for k in ("metrics", "plots", "report", "work")}
    docs = evaluate(ev, degrade=DegradeParams(), inference=InferenceParams(), seed=0, device="cpu", metrics_dir=out["metrics"],
                    plots_dir=out["plots"], report_dir=out["report"], work_dir=out["work"], load_pipeline=load)
    assert loads == [1], "the pipeline is loaded once per stage"
    # each method asked the pipeline for its own settings, 2 images each; then the 2x2 sweep
    calls = [c[:3] for c in pipe.calls]
    assert calls[:6] == [("ganemb", 600, 2)] * 2 + [("ganemb", 1000, 2)] * 2 + [("full", None, 3)] * 2
    assert sorted(set(calls[6:])) == [("ganemb", t, s) for t in (600, 1000) for s in (2, 3)]

    doc = json.loads((out["metrics"] / "embedded.json").read_text())
    validate_metrics(doc)
    assert doc == json.loads(json.dumps(docs["embedded"]))
    assert list(doc["methods"]) == ["bicubic", "gan", "ganemb-rec", "ganemb-gen", "full"]
    assert doc["metrics"]["lpips"]["available"] is False and "lpips" not in doc["methods"]["full"]
    # pyiqa's NIQE (the default protocol's) scores 96² outputs too; basicsr's needs two 96² blocks
    assert doc["metrics"]["niqe"]["source"].startswith("pyiqa niqe") and "failures" not in doc["metrics"]["niqe"]
    assert doc["dataset"]["protocol"] == {"name": "authors", "crop_border": 4, "psnr_ssim": "basicsr", "niqe": "pyiqa"}
    # the bicubic row is what bicubic upscaling of the written LQ scores, computed independently
    from PIL import Image

    from consissr.compat import calculate_psnr
    ref = []
    for image_id in [r["id"] for r in doc["per_image"] if r["method"] == "bicubic"]:
        lq = np.asarray(Image.open(out["work"] / "embedded" / "lq" / f"{image_id}.png"), np.float32) / 255
        hq = np.asarray(Image.open(out["work"] / "embedded" / "hq" / f"{image_id}.png"))
        sr = (np.clip(bicubic(lq, 4), 0, 1) * 255 + 0.5).astype(np.uint8)
        ref.append(calculate_psnr(sr[..., ::-1], hq[..., ::-1], crop_border=4, test_y_channel=True))
    assert doc["methods"]["bicubic"]["psnr"]["mean"] == pytest.approx(np.mean(ref), abs=2e-3)

    table = (out["report"] / "table.md").read_text()
    assert "| Method | PSNR↑ | SSIM↑ | LPIPS↓ | NIQE↓ | Rank(avg)↓ |" in table
    assert "(paper)" not in table  # the embedded set is not one of the paper's
    rows = json.loads((out["plots"] / "fig10.json").read_text())
    assert {(r["t_max"], r["steps"]) for r in rows} == {(600, 2), (1000, 2), (600, 3), (1000, 3)}
    assert (out["plots"] / "fig10.png").is_file() and (out["plots"] / "fig10.csv").is_file()
    grids = list((out["report"] / "grids" / "embedded").glob("*.png"))
    assert len(grids) == 1 and Image.open(grids[0]).size[0] == 6 * 96 + 5 * 2  # LQ|bicubic|GAN|ganemb-rec|full|HQ

    from mlflow import MlflowClient
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("consissr").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    m = runs[0].data.metrics
    assert m["embedded/bicubic/psnr"] == pytest.approx(doc["methods"]["bicubic"]["psnr"]["mean"])
    assert [h.step for h in client.get_metric_history(runs[0].info.run_id, "fig10/steps2/psnr")] == [600, 1000]


def test_paper_rows_appear_for_a_paper_dataset(tmp_path, mlflow_uri):
    ev = EvaluateParams(datasets=(EvalDatasetParams(name="mine", kind="embedded", count=1, paper="RealSR"),),
                        lr_crop=24, methods=("bicubic",), metrics=("psnr",), sweep_t_max=(), sweep_steps=())
    evaluate(ev, degrade=DegradeParams(), inference=InferenceParams(), seed=0, device="cpu", metrics_dir=tmp_path / "m", plots_dir=tmp_path / "p",
             report_dir=tmp_path / "r", work_dir=tmp_path / "w",
             load_pipeline=lambda: pytest.fail("bicubic alone needs no pipeline"))
    table = (tmp_path / "r" / "table.md").read_text()
    assert "| *Ours [T1] (paper)* | *25.51* | *1.71* |" in table
    assert "| *Ours-rec-s10 [T2] (paper)* | *26.12* | *2.00* |" in table


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="unknown method 'ganemb'; known: bicubic"):
        method_settings(EvaluateParams(methods=("ganemb",)))


def test_an_evaluation_image_used_for_training_fails_the_stage(tmp_path):
    import skimage.data

    from consissr.data.sources import ContaminationError, content_hash
    from consissr.evaluation.datasets import build_set
    from consissr.evaluation.stage import check_contamination

    s = build_set(EvalDatasetParams(name="embedded", kind="embedded", count=2), EvaluateParams(lr_crop=24),
                  DegradeParams(), seed=0)
    index = tmp_path / "index.json"
    index.write_text(json.dumps({"items": [{"source": "x.png", "source_sha256": content_hash(skimage.data.rocket())}]}))
    check_contamination([s], index)  # rocket is a training photo, not an evaluation one
    index.write_text(json.dumps({"items": [{"source": "leak.png", "source_sha256": content_hash(skimage.data.coffee())}]}))
    with pytest.raises(ContaminationError, match="skimage:coffee.*leak.png"):
        check_contamination([s], index)


def test_a_folder_of_outputs_made_elsewhere_is_scored_beside_our_methods(tmp_path, mlflow_uri):
    """evaluate.folders: SR images read by pair id, scored by the same suite, in the same table and grid;
    a pair without an output, or an output of the wrong size, is a recorded skip."""
    from PIL import Image

    from consissr.config import EvalFolderParams
    from consissr.data.layout import read_rgb_array

    ev0 = EvaluateParams(datasets=(EvalDatasetParams(name="embedded", kind="embedded", count=3),), lr_crop=24,
                         methods=("bicubic",), metrics=("psnr",), sweep_t_max=(), sweep_steps=(), grid_images=1)
    out0 = {k: tmp_path / "first" / k for k in ("m", "p", "r", "w")}
    evaluate(ev0, degrade=DegradeParams(), inference=InferenceParams(), seed=0, device="cpu", metrics_dir=out0["m"],
             plots_dir=out0["p"], report_dir=out0["r"], work_dir=out0["w"], load_pipeline=lambda: pytest.fail("no"))
    ids = sorted(p.stem for p in (out0["w"] / "embedded" / "hq").glob("*.png"))
    # "made elsewhere": bicubic for the first pair (so it must score as our bicubic row does), the second
    # saved under another stem (no output for it), and one of the wrong size
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for i, name in ((0, f"{ids[0]}.png"), (1, f"{ids[1]}.jpg.png")):
        lq = read_rgb_array(out0["w"] / "embedded" / "lq" / f"{ids[i]}.png").astype(np.float32) / 255
        Image.fromarray((np.clip(bicubic(lq, 4), 0, 1) * 255 + 0.5).astype(np.uint8)).save(elsewhere / name)
    Image.fromarray(np.zeros((50, 50, 3), np.uint8)).save(elsewhere / f"{ids[2]}.png")
    ev = EvaluateParams(**{**ev0.__dict__, "folders": (EvalFolderParams(method="theirs", dataset="embedded",
                                                                        path=str(elsewhere)),)})
    out = {k: tmp_path / "second" / k for k in ("m", "p", "r", "w")}
    doc = evaluate(ev, degrade=DegradeParams(), inference=InferenceParams(), seed=0, device="cpu", metrics_dir=out["m"],
                   plots_dir=out["p"], report_dir=out["r"], work_dir=out["w"],
                   load_pipeline=lambda: pytest.fail("a folder method needs no pipeline"))["embedded"]
    validate_metrics(doc)
    rows = {r["id"]: r for r in doc["per_image"] if r["method"] == "theirs"}
    ours = {r["id"]: r for r in doc["per_image"] if r["method"] == "bicubic"}
    assert list(rows) == [ids[0]] and rows[ids[0]]["psnr"] == ours[ids[0]]["psnr"]
    assert doc["methods"]["theirs"]["settings"] == {"folder": str(elsewhere), "suffix": ""}
    reasons = {s["path"].rsplit("/", 1)[-1]: s["reason"] for s in doc["dataset"]["skipped"] if s.get("method")}
    assert reasons == {f"{ids[1]}.*": f"no theirs output for pair {ids[1]}",  # the .jpg.png has another stem
                       f"{ids[2]}.png": "size 50x50 is neither the evaluated HQ size 96x96"}  # crops: no whole LR
    assert "| theirs |" in (out["r"] / "table.md").read_text()
    grid = Image.open(next((out["r"] / "grids" / "embedded").glob("*.png")))
    assert grid.size[0] == 4 * 96 + 3 * 2  # LQ | bicubic | theirs | HQ


def test_the_gan_alone_is_scored_without_a_diffusion_model_beside_its_published_row(tmp_path, mlflow_uri):
    """The default GAN (Real-ESRGAN x4plus from the wheel) in a folder with no diffusion parts: evaluate loads
    the GAN by itself, names its source in the report and the MLflow run, and prints the published
    Real-ESRGAN row of a paired paper set with ours minus it."""
    import skimage.data
    from mlflow import MlflowClient
    from PIL import Image

    from consissr.models.gan import X4PLUS_ARCH, record_pretrained

    record_pretrained("realesrgan-x4plus-ncnn", tmp_path / "pipe" / "gan", **X4PLUS_ARCH)
    for folder in ("test_HR", "test_LR"):
        (tmp_path / folder).mkdir()
    for name, photo in (("a", skimage.data.astronaut()), ("b", skimage.data.coffee())):
        hr = photo[100:196, 100:196]
        Image.fromarray(hr).save(tmp_path / "test_HR" / f"{name}.png")
        Image.fromarray(hr).resize((24, 24), Image.BICUBIC).save(tmp_path / "test_LR" / f"{name}.png")
    ev = EvaluateParams(datasets=(EvalDatasetParams(name="RealSR", kind="paired", lr=str(tmp_path / "test_LR"),
                                                    hr=str(tmp_path / "test_HR"), paper="RealSR"),),
                        lr_crop=24, methods=("bicubic", "gan"), metrics=("psnr", "ssim"), protocol="pyiqa",
                        sweep_t_max=(), sweep_steps=(), grid_images=1)
    doc = evaluate(ev, degrade=DegradeParams(), inference=InferenceParams(), seed=0, device="cpu",
                   metrics_dir=tmp_path / "m", plots_dir=tmp_path / "p", report_dir=tmp_path / "r",
                   work_dir=tmp_path / "w", pipeline_dir=tmp_path / "pipe")["RealSR"]  # no backbone there
    assert doc["methods"]["gan"]["psnr"]["n"] == 2
    table = (tmp_path / "r" / "table.md").read_text()
    assert "GAN: Real-ESRGAN x4plus (fp16 ncnn export)." in table and "Protocol: pyiqa" in table
    assert "| *Real-ESRGAN (published: osediff_t7, ccsr_t1)* | *25.69* | *0.7616* |" in table
    ours = doc["methods"]["gan"]["psnr"]["mean"]
    assert f"- gan − Real-ESRGAN (published: osediff_t7, ccsr_t1): PSNR {ours - 25.69:+.2f}" in table
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("consissr").experiment_id])
    assert run.data.tags["gan.source"] == "Real-ESRGAN x4plus (fp16 ncnn export)"
    assert run.data.tags["evaluate.protocol"] == "pyiqa"


def test_only_diffusion_methods_or_the_sweep_need_the_pipeline():
    from consissr.evaluation.stage import needs_pipeline

    assert not needs_pipeline(EvaluateParams(methods=("bicubic", "gan"), sweep_steps=()))
    assert needs_pipeline(EvaluateParams(methods=("gan",), sweep_steps=(5,)))  # Fig. 10 runs GANEmb
    assert needs_pipeline(EvaluateParams(methods=("bicubic", "full"), sweep_steps=()))
