"""The `retrain` flow's promote step on a prebuilt project copy, then the registered champion predicting a photo.

The copy holds the tiny stage outputs (test_inference's `parts`: backbone, ConsisSR net, robust CLIP, GAN) as
data/models/* and an evaluate metrics document; the flow runs only `promote` (against the local Prefect
server of conftest), twice: the first version becomes the champion, the second (lower PSNR) does not.
"""

import json
import shutil

import numpy as np
import pytest
import yaml
from conftest import REPO
from test_inference import parts  # noqa: F401  (the tiny stage folders)

pytestmark = pytest.mark.slow


def write_psnr(repo, psnr: float) -> None:
    (repo / "metrics").mkdir(exist_ok=True)
    (repo / "metrics" / "embedded.json").write_text(json.dumps({"methods": {"full": {"psnr": {"mean": psnr}}}}))


def test_flow_promote_returns_the_decision_and_the_champion_upscales_a_photo(parts, prefect_server, tmp_path,  # noqa: F811
                                                                             monkeypatch):
    import mlflow
    from mlflow import MlflowClient
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from skimage import data

    from consissr.inference.pipeline import load_pipeline
    from pipelines.retrain import retrain

    repo = tmp_path / "repo"
    (repo / "configs").mkdir(parents=True)
    shutil.copy(REPO / "configs" / "retrain.yaml", repo / "configs" / "retrain.yaml")
    for name, folder in parts.items():
        (repo / "data" / "models" / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / "data" / "models" / name).symlink_to(folder, target_is_directory=True)
    # what `dvc repro` would have recorded for two of promote's inputs (each run tags the hash of its inputs)
    (repo / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "train_sdsr": {"outs": [{"path": "data/models/consissr", "md5": "0123456789abcdef.dir"}]},
        "evaluate": {"outs": [{"path": "metrics/embedded.json", "md5": "fedcba9876543210"}]}}}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)

    results = []
    with temporary_settings({PREFECT_API_URL: prefect_server["PREFECT_API_URL"]}):
        for psnr in (20.0, 19.5):
            write_psnr(repo, psnr)
            results.append(retrain(stages=["promote"], repo=str(repo)))
    first, second = (r["promote"] for r in results)
    assert [r["steps"] for r in results] == [{"promote": "promoted"}, {"promote": "kept"}]
    assert (first["promote"], first["version"], first["previous"]) == (True, "1", None)
    assert first["metrics"] == {"embedded": 20.0}
    assert (second["promote"], second["version"], second["previous"]) == (False, "2", "1")
    assert "19.5 vs champion 20" in second["reasons"][0] and "not better" in second["reasons"][0]

    # MLflow: each promote run nests under its flow's `retrain` run and carries the profile and input hashes
    client = MlflowClient(uri, registry_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("consissr").experiment_id],
                              order_by=["attributes.start_time ASC"])
    flows = [r for r in runs if r.data.tags["stage"] == "retrain"]
    promotes = [r for r in runs if r.data.tags["stage"] == "promote"]
    assert len(flows) == 2 and len(promotes) == 2
    assert [r.data.tags.get("mlflow.parentRunId") for r in promotes] == [r.info.run_id for r in flows]
    assert all("mlflow.parentRunId" not in r.data.tags for r in flows)
    assert [r.data.tags["promote.decision"] for r in promotes] == ["promoted", "kept"]
    for run in promotes:
        assert run.data.tags["profile"] == "embedded"
        assert run.data.tags["input.metrics.embedded.hash"] == "md5:fedcba9876543210"
        assert run.data.tags["input.consissr.hash"] == "md5:0123456789abcdef.dir"
    assert str(client.get_model_version_by_alias("consissr", "champion").version) == "1"

    # the champion from the registry upscales a real photo (a crop of scikit-image's chelsea) 4x
    photo = data.chelsea()[80:104, 140:172].astype(np.float32) / 255.0
    model = mlflow.pyfunc.load_model("models:/consissr@champion")
    knobs = {"num_inference_steps": 2, "seed": 3}
    out = model.predict(photo, params=knobs)
    assert len(out) == 1 and out[0].shape == (96, 128, 3) and out[0].dtype == np.float32
    assert np.isfinite(out[0]).all() and out[0].min() >= 0.0 and out[0].max() <= 1.0
    assert out[0].std() > 0.02  # an image, not a constant
    # exactly what the pipeline gives for these knobs: predict's params reach it (2 steps, the seed)
    direct = load_pipeline(None, device="cpu", stage_dirs=parts)(photo, output_type="np", **knobs).images[0]
    np.testing.assert_allclose(out[0], direct, atol=1e-5)
    other_seed = model.predict(photo, params={**knobs, "seed": 4})[0]
    assert np.abs(other_seed - out[0]).max() > 1e-3
