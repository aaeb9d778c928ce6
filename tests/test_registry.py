"""The Registry and option() helpers every named kind is built on."""

import dataclasses

import pytest

from npvae.registry import Registry, UnknownName, field_flag, field_help, option


def test_registry_is_a_mapping_in_registration_order():
    reg = Registry("colour")

    @reg.register
    class Red:
        name = "red"

    reg.register("blue-entry", name="blue")
    assert list(reg) == ["red", "blue"]
    assert reg["red"] is Red and reg["blue"] == "blue-entry"
    assert "red" in reg and "green" not in reg and ["unhashable"] not in reg
    assert len(reg) == 2 and dict(reg.items())["blue"] == "blue-entry"


def test_unknown_names_are_one_line_naming_the_choices():
    reg = Registry("colour")
    reg.register("x", name="red")
    with pytest.raises(UnknownName) as info:
        reg["green"]
    assert str(info.value) == "unknown colour 'green': expected one of red"
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    with pytest.raises(ValueError, match="unknown --colour 'green'"):
        reg.check("green", "--colour")
    assert reg.check("red") == "red"


def test_a_name_registered_twice_is_refused():
    reg = Registry("colour")
    reg.register("x", name="red")
    reg.register("x", name="red")  # the same entry again is harmless (a module imported twice)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("y", name="red")
    with pytest.raises(ValueError, match="needs a name"):
        reg.register(object())


def test_where_filters_by_what_entries_say():
    reg = Registry("number")
    for n in range(5):
        reg.register(n, name=str(n))
    assert reg.where(lambda v: v % 2 == 0) == ("0", "2", "4")


def test_option_fields_carry_help_and_flag():
    @dataclasses.dataclass
    class Config:
        latent_dim: int = option(20, "Z, the code size")
        noise_level: float = option(0.2, "fraction of pixels hit", flag="--noise")
        plain: int = 3

    fields = {f.name: f for f in dataclasses.fields(Config)}
    assert Config().latent_dim == 20
    assert field_help(fields["latent_dim"]) == "Z, the code size"
    assert field_flag(fields["latent_dim"]) == "--latent-dim"
    assert field_flag(fields["noise_level"]) == "--noise"
    assert field_help(fields["plain"]) == "" and field_flag(fields["plain"]) == "--plain"
