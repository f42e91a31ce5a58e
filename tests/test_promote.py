"""The champion rule (metric + direction per dataset) and the alias move on a local sqlite MLflow store."""

import json

import pytest

from consissr.errors import ParamsError
from consissr.promote import Rule, decide, load_rules, promote, read_metrics

PSNR = Rule("embedded", "metrics/embedded.json", "methods.full.psnr.mean", "max")
LPIPS = Rule("set5", "metrics/set5.json", "methods.full.lpips.mean", "min")


def test_no_champion_yet_promotes():
    assert decide([PSNR], {"embedded": 20.0}, None).promote


@pytest.mark.parametrize("new, old, expected", [(21.0, 20.0, True), (20.0, 20.0, False), (19.0, 20.0, False)])
def test_max_rule_needs_a_strictly_higher_value(new, old, expected):
    decision = decide([PSNR], {"embedded": new}, {"embedded": old})
    assert decision.promote is expected
    assert "better" in decision.reasons[0] and "embedded" in decision.reasons[0]


def test_min_rule_and_every_dataset_must_improve():
    champion = {"embedded": 20.0, "set5": 0.30}
    assert decide([PSNR, LPIPS], {"embedded": 21.0, "set5": 0.25}, champion).promote
    assert not decide([PSNR, LPIPS], {"embedded": 21.0, "set5": 0.35}, champion).promote  # lpips worse
    assert not decide([PSNR, LPIPS], {"embedded": 19.0, "set5": 0.25}, champion).promote  # psnr worse


def test_bad_rules_and_missing_metrics_name_the_file(tmp_path):
    with pytest.raises(ParamsError, match="direction"):
        Rule("x", "m.json", "a", "up")
    (tmp_path / "cfg.yaml").write_text("promote: {}\n")
    with pytest.raises(ParamsError, match="cfg.yaml"):
        load_rules(tmp_path / "cfg.yaml")
    with pytest.raises(ParamsError, match="embedded.json"):
        read_metrics([PSNR], tmp_path)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "embedded.json").write_text(json.dumps({"methods": {"gan": {}}}))
    with pytest.raises(ParamsError, match="methods.full.psnr.mean"):
        read_metrics([PSNR], tmp_path)


def test_alias_moves_only_when_the_rule_says_better(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg.yaml").write_text(
        "promote:\n  model_name: consissr-test\n  alias: champion\n  rules:\n"
        "    - {dataset: embedded, file: metrics/embedded.json, key: methods.full.psnr.mean, direction: max}\n")
    model = tmp_path / "pipeline"
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    (tmp_path / "metrics").mkdir()
    client = MlflowClient(uri, registry_uri=uri)
    champions = []
    for psnr in (20.0, 19.0, 21.0):
        (tmp_path / "metrics" / "embedded.json").write_text(json.dumps({"methods": {"full": {"psnr": {"mean": psnr}}}}))
        promote(tmp_path / "cfg.yaml", model_dir=model, root=tmp_path, profile="embedded")
        champions.append(str(client.get_model_version_by_alias("consissr-test", "champion").version))
    assert champions == ["1", "1", "3"]
    assert client.get_model_version("consissr-test", "2").tags["metric.embedded"] == "19.0"
    runs = client.search_runs([client.get_experiment_by_name("consissr").experiment_id],
                              order_by=["attributes.start_time ASC"])
    decisions = [r.data.tags["promote.decision"] for r in runs if r.data.tags["stage"] == "promote"]
    assert decisions == ["promoted", "kept", "promoted"]
    assert "19 vs champion 20" in [r for r in runs if r.data.tags.get("promote.version") == "2"][0].data.tags[
        "promote.reason"]
