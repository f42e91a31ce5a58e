"""Every params key is documented in the typed config, ranges say what validation enforces, and
docs/params.md is the generator's output."""

import dataclasses
import math
import re
import typing

import pytest
import yaml
from conftest import REPO

from consissr import docs_params
from consissr.config import (
    DegradationOrder,
    DegradeParams,
    EvaluateParams,
    Params,
    ParamsError,
    TrainVaeParams,
    load_params,
    param,
    read_yaml,
)
from consissr.docs_params import missing_docs, undocumented

PARAMS_FILES = [REPO / "params.yaml", REPO / "configs" / "paper.yaml"]


def stripped(cls, name, what, *, swap=None):
    """A copy of dataclass ``cls`` whose field ``name`` has lost its ``what`` documentation; ``swap`` maps
    field names to replacement classes of their (sub)section type."""
    hints = typing.get_type_hints(cls)
    swap = swap or {}
    fields = []
    for f in dataclasses.fields(cls):
        metadata = {**f.metadata, what: ""} if f.name == name else dict(f.metadata)
        tp = swap.get(f.name, hints[f.name])
        default = swap[f.name]() if f.name in swap else f.default
        fields.append((f.name, tp, dataclasses.field(default=default, metadata=metadata)))
    return dataclasses.make_dataclass(cls.__name__, fields, frozen=True)


@pytest.mark.parametrize("path", PARAMS_FILES, ids=lambda p: p.name)
def test_every_key_of_the_params_files_is_documented(path):
    raw = read_yaml(path.read_text())
    assert missing_docs(raw) == []
    # the walk reaches nested sections and list items: keys added there are reported
    raw["degrade"]["first"]["blur_prbo"] = 1.0
    raw["evaluate"]["datasets"].append({"name": "x", "kind": "paired", "hr_sufix": ""})
    assert missing_docs(raw) == [
        "degrade.first.blur_prbo: not a field of DegradationOrder",
        f"evaluate.datasets[{len(raw['evaluate']['datasets']) - 1}].hr_sufix: not a field of EvalDatasetParams"]


def test_every_field_has_a_meaning_and_a_range():
    assert undocumented(Params) == []
    # a range may come from the type (bool, Literal, Literal or null), never for free text
    f = {f.name: f for f in dataclasses.fields(EvaluateParams)}
    hints = typing.get_type_hints(EvaluateParams)
    # (typing caches Literals equal as sets, so the order of niqe's values follows psnr_ssim's)
    assert set(docs_params.value_range(f["niqe"], hints["niqe"]).split(" | ")) == {"pyiqa", "basicsr", "null"}
    assert docs_params.value_range(f["save_outputs"], hints["save_outputs"]) == "true | false"


def test_a_field_that_loses_its_documentation_is_reported():
    no_meaning = stripped(TrainVaeParams, "lr", "meaning")
    assert undocumented(no_meaning) == ["lr: no meaning"]
    assert missing_docs({"lr": 1e-3, "steps": 5}, no_meaning) == ["lr: no meaning"]
    assert undocumented(stripped(TrainVaeParams, "steps", "range")) == ["steps: no range"]
    # a Literal field's range comes from its type, its meaning does not
    no_meaning_literal = stripped(DegradeParams, "usm_sharpen", "meaning")
    assert undocumented(no_meaning_literal) == ["usm_sharpen: no meaning"]
    assert undocumented(stripped(DegradeParams, "usm_sharpen", "range")) == []
    # nested: a field of a subsection, and a subsection itself
    order = stripped(DegradationOrder, "sinc_prob", "meaning")
    degrade = stripped(DegradeParams, "second", "meaning", swap={"first": order, "second": order})
    assert undocumented(degrade) == ["first.sinc_prob: no meaning", "second: no meaning",
                                     "second.sinc_prob: no meaning"]
    assert missing_docs({"first": {"sinc_prob": 0.1}, "scale": 4}, degrade) == ["first.sinc_prob: no meaning"]


def test_a_field_written_without_param_is_reported():
    @dataclasses.dataclass(frozen=True)
    class Section:
        """A section."""

        documented: int = param(1, "Something", range=">= 0")
        bare: int = 2

    assert undocumented(Section) == ["bare: no meaning and range"]


_BOUND = re.compile(r"(?P<each>each (?:in )?)?(?:(?P<op>>=|>) (?P<min>-?[\d.]+)|"
                    r"\[(?P<low>-?[\d.]+), (?P<high>-?[\d.]+)(?P<close>[\])]))(?P<null> or null)?(?:; .*)?")
# odd / a multiple / tiles that overlap less than their side: test_config
_OTHER_RULES = {"degrade.kernel_pad_size", "train_sdsr.global_batch_size", "inference.tile_size",
                "inference.tile_overlap"}


def _sections(obj, prefix=""):
    """(dotted prefix, instance) of every (sub)section of a Params instance, list items included."""
    yield prefix, obj
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _sections(value, f"{prefix}{f.name}.")
        elif isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]):
            for item in value:
                yield from _sections(item, f"{prefix}{f.name}[].")


def _numeric(tp):
    """(int or float, is a list) for a number, a number or null, or a list of numbers; None for other types."""
    args = [a for a in typing.get_args(tp) if a is not type(None) and a is not Ellipsis]
    if tp in (int, float):
        return tp, False
    if len(args) == 1 and args[0] in (int, float) and typing.get_origin(tp) is not tuple:
        return args[0], False  # X | None
    if typing.get_origin(tp) is tuple and args and all(a is args[0] for a in args) and args[0] in (int, float):
        return args[0], True
    return None


def _inside_outside(m, kind):
    """Values the documented bound accepts, and values just outside it."""
    def step(x, d):
        return x + d if kind is int else math.nextafter(x, math.inf * d)

    if m["op"]:
        bound = kind(float(m["min"]))
        return ([bound], [step(bound, -1)]) if m["op"] == ">=" else ([step(bound, 1)], [bound])
    low, high = kind(float(m["low"])), kind(float(m["high"]))
    if m["close"] == "]":
        return [low, high], [step(low, -1), step(high, 1)]
    return [low], [step(low, -1), high]


def test_documented_ranges_are_what_validation_enforces():
    checked, unparsed = [], set()
    for prefix, obj in _sections(Params()):
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            numeric, rng = _numeric(hints[f.name]), f.metadata.get("range", "")
            if numeric is None:
                continue
            kind, is_list = numeric
            key = prefix.replace("[]", "") + f.name
            m = _BOUND.fullmatch(rng)
            if m is None or bool(m["each"]) != is_list:
                if not is_list and "not checked on load" not in rng:
                    unparsed.add(key)
                continue
            inside, outside = _inside_outside(m, kind)
            if is_list:  # "each": every item at the value
                n = len(getattr(obj, f.name))
                inside, outside = [(v,) * n for v in inside], [(v,) * n for v in outside]
            for v in inside + ([None] if m["null"] else []):
                dataclasses.replace(obj, **{f.name: v})
            for v in outside:
                with pytest.raises(ParamsError, match=rf"^{f.name}: "):
                    dataclasses.replace(obj, **{f.name: v})
            checked.append(key)
    assert unparsed == _OTHER_RULES, "a number's range is a bound, or says 'not checked on load'"
    assert len(checked) >= 50 and {"train_vae.ema_decay", "degrade.second.sinc_prob", "train_gan.betas",
                                    "prepare.clip_crop_size", "prepare.crops_per_image",
                                    "evaluate.crop_border"} <= set(checked)


def _rows(text, heading):
    """The table under ``heading`` as {key: [meaning, unit, range, default, paper]}."""
    block = text.split(f"\n{heading}\n", 1)[1].split("\n#", 1)[0]
    rows = {}
    for line in block.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            assert len(cells) == 6, line
            rows[cells[0].strip("`")] = cells[1:]
    return rows


def test_committed_page_is_the_generated_one():
    text = (REPO / "docs" / "params.md").read_text()
    assert text == docs_params.render(load_params(REPO / "configs" / "paper.yaml")), \
        "docs/params.md is stale: run python -m consissr.docs_params"
    assert text.startswith("# Params reference\n")
    default = yaml.safe_load((REPO / "params.yaml").read_text())
    paper = yaml.safe_load((REPO / "configs" / "paper.yaml").read_text())

    def cell(text):  # a default / paper cell read back as YAML
        return yaml.safe_load(text.strip("`"))

    for section in default:  # one table per section, one row per key, showing the files' values
        rows = _rows(text, f"## {section}")
        for key, value in default[section].items():
            if isinstance(value, dict):
                assert _rows(text, f"### {section}.{key}").keys() == value.keys()
                continue
            *_, shown, other = rows[key]
            if key == "datasets":  # a list of mappings shows the keys that differ from their defaults
                assert [d["name"] for d in cell(shown)] == [d["name"] for d in value]
                assert [d["name"] for d in cell(other)] == [d["name"] for d in paper[section][key]]
                continue
            assert cell(shown) == value, (section, key)
            assert cell(other) == paper[section][key] if other else paper[section][key] == value, (section, key)
    assert _rows(text, "## prepare")["crop_size"][3:] == ["`128`", "`512`"]


def test_check_flag_reports_a_stale_page(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    page = tmp_path / "params.md"
    assert docs_params.main(["--check", "--output", str(page)]) == 1  # absent
    assert docs_params.main(["--output", str(page)]) == 0
    assert docs_params.main(["--check", "--output", str(page)]) == 0
    page.write_text(page.read_text().replace("Adam", "Adamw", 1))
    assert docs_params.main(["--check", "--output", str(page)]) == 1
    assert "stale" in capsys.readouterr().err
    assert docs_params.main(["--output", str(page), "--paper", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err
