"""DistillationConfig refuses settings that would train silently wrong, with the fix in the message; its help
texts state the code's defaults."""

import dataclasses
import math

import pytest
from tiny import make_args

from hf_kd import DistillationConfig
from hf_kd.losses import Recipe, build_loss
from hf_kd.losses.core import DEFAULT_CHUNK_ELEMENTS


@pytest.mark.parametrize("temperature", [0.0, -1.0, math.nan, math.inf])
def test_kd_temperature_must_be_positive(tmp_path, temperature):
    with pytest.raises(ValueError, match=r"kd_temperature must be a positive number.*None for each method"):
        make_args(tmp_path, kd_temperature=temperature)


def test_a_positive_kd_temperature_and_none_are_accepted(tmp_path):
    (akl,) = Recipe.from_config(make_args(tmp_path, kd_temperature=2.0, kd_loss="akl")).terms
    assert akl.options["temperature"] == 2.0 and akl.build().temperature == 2.0
    assert make_args(tmp_path).kd_temperature is None


def test_unknown_loss_name_lists_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown loss 'kl'\. Known losses: .*akl.*fkl.*jsd"):
        make_args(tmp_path, kd_loss="0.5*ce+0.5*kl")


@pytest.mark.parametrize("recipe", ["0*fkl", "0*fkl+0.0*ce", "1e999*fkl"])
def test_recipe_weights_must_sum_to_a_positive_finite_number(tmp_path, recipe):
    with pytest.raises(ValueError, match=r"sum to (0|inf).*at least one term a positive, finite weight"):
        make_args(tmp_path, kd_loss=recipe)


def test_a_zero_weight_term_is_allowed_beside_a_positive_one(tmp_path):
    assert make_args(tmp_path, kd_loss="fkl+0*akl").kd_loss == "fkl+0*akl"


@pytest.mark.parametrize("recipe", ["-1*fkl", "fkl+-0.5*ce", "fkl-ce"])
def test_negative_weights_are_refused(tmp_path, recipe):
    with pytest.raises(ValueError, match=r"weights >= 0 \(no subtraction"):
        make_args(tmp_path, kd_loss=recipe)


@pytest.mark.parametrize("kwargs", [{"temperature": 0.0}, {"akl_temperature": -2.0}])
def test_build_loss_refuses_a_temperature_that_is_not_positive(kwargs):
    with pytest.raises(ValueError, match=r"akl: temperature must be a positive number"):
        build_loss("akl", **kwargs)


def test_loss_chunk_size_help_states_the_default():
    (chunk_field,) = [f for f in dataclasses.fields(DistillationConfig) if f.name == "loss_chunk_size"]
    assert f"about {round(DEFAULT_CHUNK_ELEMENTS * 4 / 2**20)} MiB" in chunk_field.metadata["help"]
