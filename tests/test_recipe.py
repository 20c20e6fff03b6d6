"""Recipes: one object says what a prune does; files, command-line overrides, reports that replay."""

from __future__ import annotations

import dataclasses
import json

import pytest

from onnxprune.cli import main
from onnxprune.errors import InputError
from onnxprune.pipeline.prune import prune_model
from onnxprune.recipe import Recipe, load_recipe
from onnxprune.pipeline.prune import RunSettings
from tests.shipped_models import DIGITS

CALIB, HELDOUT = DIGITS.calib_path, DIGITS.heldout_path


def _prune(*argv) -> int:
    return main(["prune", *map(str, argv)])


@pytest.mark.parametrize("options", [
    ["--ratio", "0.4", "--recover", "lstsq", "--round-to", "4"],            # hybrid scores (the data default)
    ["--target-macs", "0.5", "--criterion", "l2", "--recover", "bias", "--allocate", "uniform"],
    ["--max-drop", "1", "--eval-data", HELDOUT, "--recover", "lstsq"],      # the report holds the target found
    ["--ratio", "0.3", "--quantize", "int8"],
    ["--mode", "unstructured", "--ratio", "0.6"],
])
def test_a_reports_recipe_replays_to_a_byte_identical_model(digits_file, tmp_path, options):
    first, second, report = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "a.json"
    assert _prune(digits_file, "--data", CALIB, "--limit", "120", "-o", first, "--json", report, *options) == 0
    recipe = json.loads(report.read_text())["recipe"]
    assert set(recipe) == {f.name for f in dataclasses.fields(Recipe)}
    assert recipe["criterion"] is not None  # defaults are resolved in the report
    if "--max-drop" in options:
        assert recipe["target_macs"] is not None and recipe["ratio"] is None
    assert _prune(digits_file, "--recipe", report, "--data", CALIB, "--limit", "120", "-o", second) == 0
    assert first.read_bytes() == second.read_bytes()
    # the original run's options differ from the defaults, so replaying defaults would not match
    assert _prune(digits_file, "--data", CALIB, "--limit", "120", "-o", tmp_path / "c.onnx") == 0
    assert (tmp_path / "c.onnx").read_bytes() != first.read_bytes()


def test_command_line_options_override_a_recipe_file(digits_file, tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('# hand-written\nratio = 0.5\nround_to = 8\nrecover = "bias"\ncriterion = "l2"\n'
                    'exclude = ["nothing*"]\n')
    report = tmp_path / "r.json"

    def run(*extra) -> dict:
        assert _prune(digits_file, "--recipe", path, "--data", CALIB, "--limit", "64", "--dry-run", "--json", report,
                      *extra) == 0
        return json.loads(report.read_text())["recipe"]

    plain = run()
    assert (plain["ratio"], plain["round_to"], plain["recover"], plain["criterion"]) == (0.5, 8, "bias", "l2")
    # only options given on the command line override; their defaults (--recover none, --round-to 1) do not
    over = run("--ratio", "0.25", "--recover", "none")
    assert (over["ratio"], over["round_to"], over["recover"], over["criterion"]) == (0.25, 8, "none", "l2")
    assert over["exclude"] == ["nothing*"]
    # a different budget on the command line replaces the file's ratio instead of clashing with it
    target = run("--target-macs", "0.6")
    assert target["ratio"] is None and target["target_macs"] == 0.6
    assert run("--exclude", "a", "--exclude", "b")["exclude"] == ["a", "b"]


def test_toml_and_json_recipes_are_the_same_recipe(tmp_path):
    toml = tmp_path / "r.toml"
    toml.write_text('criterion = "hybrid"\ntarget_params = 0.5\nallocate = "uniform"\nquantize = "none"\n'
                    'prune_hidden = false\nseed = 3\n')
    recipe = load_recipe(toml)
    assert recipe == Recipe(criterion="hybrid", target_params=0.5, allocate="uniform", seed=3)
    as_json = tmp_path / "r.json"
    as_json.write_text(json.dumps(recipe.to_dict()))
    assert load_recipe(as_json) == recipe
    wrapped = tmp_path / "report.json"
    wrapped.write_text(json.dumps({"model": "x.onnx", "recipe": recipe.to_dict()}))
    assert load_recipe(wrapped) == recipe
    assert Recipe.from_dict(json.loads(recipe.key())) == recipe


@pytest.mark.parametrize("text, needle", [
    ("ratoi = 0.5\n", "unknown key 'ratoi'; did you mean 'ratio'?"),
    ("colour = 'red'\n", "unknown key 'colour'"),
    ('ratio = "half"\n', "'ratio' must be a number, got 'half'"),
    ("round_to = 8.0\n", "'round_to' must be an integer"),
    ("prune_hidden = 1\n", "'prune_hidden' must be true or false"),
    ("exclude = 'conv*'\n", "'exclude' must be a list of strings"),
    ("ratio = 1.5\n", "'ratio' must be in [0, 1), got 1.5"),
    ("target_macs = 0\n", "'target_macs' is the fraction to keep"),
    ("round_to = 0\n", "'round_to' must be >= 1"),
    ('recover = "magic"\n', "'recover' must be one of none, bias, lstsq"),
    ('gqa_mode = "all-heads"\n', "'gqa_mode' must be one of auto, kv-groups, query-heads"),
    ("keep_kv_cache = 'yes'\n", "'keep_kv_cache' must be true or false"),
    ("ratio = 0.5\ntarget_macs = 0.5\n", "give one of 'ratio', 'target_macs'"),
    ("ratio = 0.5\n[more]\n", "unknown key 'more'"),
    ("ratio = \n", "not valid TOML"),
])
def test_bad_recipe_files_are_one_line_errors_naming_the_key(digits_file, tmp_path, cli_error, text, needle):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    err = cli_error(["prune", str(digits_file), "--recipe", str(path), "--dry-run"], needle)
    assert "bad.toml" in err
    assert not digits_file.with_name("digits.pruned.onnx").exists()


def test_bad_json_recipes(digits_file, tmp_path, cli_error):
    report = tmp_path / "r.json"
    report.write_text(json.dumps({"recipe": {"ratio": None, "seed": -1}}))
    cli_error(["prune", str(digits_file), "--recipe", str(report), "--dry-run"], "'seed' must be >= 0")
    report.write_text("[1, 2]")
    cli_error(["prune", str(digits_file), "--recipe", str(report), "--dry-run"], "expected a table of keys")
    report.write_text("{ratio: 0.5}")
    cli_error(["prune", str(digits_file), "--recipe", str(report), "--dry-run"], "not valid JSON")
    cli_error(["prune", str(digits_file), "--recipe", str(tmp_path / "none.toml")], "recipe file not found")


def test_python_api_takes_a_recipe_and_keywords_remain_a_thin_layer(digits):
    from onnxprune.evaluate.data import load_data

    model = digits.cnn()
    calib = load_data(CALIB, model, limit=64)
    recipe = Recipe(ratio=0.3, criterion="hybrid", recover="lstsq", round_to=2)
    by_recipe = prune_model(model, recipe, RunSettings(calibration=calib))
    by_keywords = prune_model(model, Recipe(ratio=0.3, criterion="hybrid", recover="lstsq", round_to=2), RunSettings(calibration=calib))
    assert by_recipe.model.SerializeToString() == by_keywords.model.SerializeToString()
    assert by_recipe.recipe == by_keywords.recipe == recipe
    # keywords override a recipe's fields; a MAC target replaces its ratio
    budget = prune_model(model, recipe.replace(target_macs=0.5), RunSettings(calibration=calib))
    assert budget.recipe.ratio is None and budget.recipe.target_macs == 0.5
    assert budget.stats["macs_after"] <= 0.5 * budget.stats["macs_before"]
    # without a recipe the criterion is l1, as before recipes; a Recipe resolves to hybrid with data
    assert prune_model(model, Recipe(ratio=0.3, criterion="l1"), RunSettings(calibration=calib)).recipe.criterion == "l1"
    assert prune_model(model, Recipe(ratio=0.3), RunSettings(calibration=calib)).recipe.criterion == "hybrid"
    assert prune_model(model, Recipe(ratio=0.3)).recipe == Recipe(criterion="l1", ratio=0.3)  # no data: l1


def test_recipes_are_values_checked_when_made():
    recipe = Recipe(ratio=0.5, exclude=["a*"])
    assert recipe.exclude == ("a*",) and hash(recipe) == hash(Recipe(ratio=0.5, exclude=("a*",)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.ratio = 0.1  # type: ignore[misc]
    with pytest.raises(InputError, match="--ratio must be in"):
        Recipe(ratio=1.0)
    with pytest.raises(InputError, match="--head-ratio goes with --ratio"):
        Recipe(head_ratio=0.2, target_macs=0.5)
    with pytest.raises(InputError, match="--gqa-mode must be one of"):
        Recipe(gqa_mode="both")
    assert Recipe(ratio=0.5, head_ratio=0.2).replace(ratio=0.3).head_ratio == 0.2
    assert Recipe(ratio=0.5, head_ratio=0.2).replace(target_params=0.4) == Recipe(target_params=0.4)
    assert Recipe(quantize="none").quantize is None
    assert Recipe(criterion="l1", mode="unstructured").resolved(has_data=True).ratio == 0.5
    assert Recipe().resolved(has_data=True).criterion == "hybrid"
    assert Recipe(mode="unstructured").resolved(has_data=True).criterion == "l1"
