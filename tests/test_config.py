"""Config layer: YAML + dotted overrides, errors that name the key and where it was set."""
import pytest

from reason.config import ConfigError, Section, load_config, parse_override


class Opt(Section):
    lr: float = 1e-5
    warmup: int = 0


class Cfg(Section):
    name: str = "run"
    opt: Opt = Opt()
    tags: list[str] = []


def write(tmp_path, text):
    p = tmp_path / "recipe.yaml"
    p.write_text(text)
    return p


def test_yaml_and_overrides(tmp_path):
    p = write(tmp_path, "name: a\nopt:\n  lr: 2.0e-5\n")
    cfg = load_config(Cfg, p, ["opt.warmup=450", "tags=[x, y]"])
    assert cfg == Cfg(name="a", opt=Opt(lr=2e-5, warmup=450), tags=["x", "y"])
    assert load_config(Cfg, p, ["name=b"]).name == "b"  # later wins


def test_override_values_are_yaml_scalars():
    assert parse_override("rl.group_size=16") == (["rl", "group_size"], 16)
    assert parse_override("a=true") == (["a"], True)
    assert parse_override("a=hello world") == (["a"], "hello world")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("novalue")


def test_unknown_key_names_file_and_line(tmp_path):
    p = write(tmp_path, "name: a\nopt:\n  lr: 1.0\n  lrr: 2.0\n")
    with pytest.raises(ConfigError) as e:
        load_config(Cfg, p)
    assert f"{p}:4" in str(e.value) and "'opt.lrr'" in str(e.value) and "unknown key" in str(e.value)


def test_bad_value_from_override_names_the_override(tmp_path):
    p = write(tmp_path, "name: a\n")
    with pytest.raises(ConfigError) as e:
        load_config(Cfg, p, ["opt.warmup=lots"])
    assert "--set opt.warmup=lots" in str(e.value) and "'opt.warmup'" in str(e.value)


def test_invalid_yaml_names_line(tmp_path):
    p = write(tmp_path, "name: a\nopt: [unclosed\n")
    with pytest.raises(ConfigError, match=r"recipe.yaml:\d+: invalid YAML"):
        load_config(Cfg, p)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(Cfg, tmp_path / "nope.yaml")


def test_override_into_scalar_is_an_error(tmp_path):
    p = write(tmp_path, "name: a\n")
    with pytest.raises(ConfigError, match="'name' is not a section"):
        load_config(Cfg, p, ["name.x=1"])


def test_override_list_items(tmp_path):
    class Term(Section):
        name: str
        weight: float = 1.0

    class WithList(Section):
        terms: list[Term]

    p = write(tmp_path, "terms:\n  - name: a\n  - name: b\n")
    assert load_config(WithList, p, ["terms.1.weight=0.5"]).terms[1].weight == 0.5
    with pytest.raises(ConfigError, match="not an item of a 2-item list"):
        load_config(WithList, p, ["terms.2.weight=1"])
