"""The bridge registry: names, declarations, config fields and the model card all come from the bridge class."""

import dataclasses

import pytest

from hf_kd import DistillationConfig
from hf_kd.bridge import BRIDGE_REGISTRY, DSKDBridge, bridge_class, register_bridge
from hf_kd.knobs import knob, knobs_of
from hf_kd.model_card import methods_used


def test_dskd_is_registered_with_its_declarations():
    assert bridge_class("dskd") is DSKDBridge
    assert DSKDBridge.paper.arxiv_id == "2406.17328"
    assert DSKDBridge.cross_vocabulary and DSKDBridge.lr_knob == "projector_lr"
    assert methods_used(["fkl"], bridge="dskd") == ["DSKD"]


def test_bridge_knobs_are_config_fields(tmp_path):
    fields = {f.name: f for f in dataclasses.fields(DistillationConfig)}
    for declared in knobs_of(DSKDBridge):
        assert fields[declared.field].default == declared.default and fields[declared.field].metadata["help"]
    assert DistillationConfig(output_dir=str(tmp_path), kd_rate=0.25).kd_rate == 0.25


def test_unknown_bridge_lists_the_registered_ones(tmp_path):
    with pytest.raises(ValueError, match="Unknown bridge 'nope'.*dskd"):
        DistillationConfig(output_dir=str(tmp_path), bridge="nope")


def test_registration_checks_declarations():
    with pytest.raises(ValueError, match="must declare"):
        register_bridge("incomplete")(type("Incomplete", (), {"paper": None}))
    knobs = dataclasses.make_dataclass("XKnobs", [("x_lr", float, knob(1.0, "lr"))])
    declared = dict(paper=None, knobs=knobs, cross_vocabulary=False)
    with pytest.raises(ValueError, match="lr_knob 'y_lr' is not one of its knobs"):
        register_bridge("wrong_lr")(type("WrongLr", (), {**declared, "lr_knob": "y_lr", "default_temperature": 1.0}))
    with pytest.raises(ValueError, match="already registered"):
        register_bridge("dskd")(type("Other", (), {**declared, "lr_knob": "x_lr", "default_temperature": 1.0}))
    assert set(BRIDGE_REGISTRY) == {"dskd"}
