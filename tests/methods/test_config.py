"""Options: every invalid value fails when the options are made, naming the field path and what is valid."""
import dataclasses

import numpy as np
import pytest
import torch

import sparsify
from sparsify import AttentionConfig, MLPConfig, SparsifyConfig
from sparsify.config import RoutedFFN, SparseAttention
from families import tiny_inputs, tiny_model

NAN, INF = float("nan"), float("inf")

# (section, field, bad value, what the message must say is valid)
BAD_FIELDS = [
    *[("attention", "keep", v, r"real number in \(0, 1\]") for v in (0, 0.0, 1.5, -1, NAN, INF, -INF)],
    *[("attention", "keep", v, r"real number in \(0, 1\]") for v in (True, "0.5", None)],
    *[("attention", "subspace_dim", v, "int >= 1") for v in (0, -8, 8.0, "8", True)],
    *[("attention", "codewords", v, "int >= 2") for v in (0, 1, 16.0, "16", False)],
    *[("attention", "codebook_loss", v, "finite real number >= 0") for v in (-1, -1e-3, NAN, INF, "0.01", True)],
    *[("attention", "min_seq", v, "int >= 0") for v in (-1, 128.0, "128", True)],
    *[("attention", "block_size", v, r"one of \[16, 32, 64, 128\]") for v in (0, 48, 256, 64.0, "64", True)],
    ("attention", "method", "magic", r"choose one of \['dense', 'spt', 'hsa', 'off'\]"),
    ("attention", "granularity", "row", r"choose one of \['token', 'block'\]"),
    ("attention", "score", "dot", r"choose one of \['codes', 'exact'\]"),
    *[("mlp", "blocks", v, "int >= 1") for v in (0, -4, 4.0, "4", True)],
    *[("mlp", "top_k", v, r"int in \[1, blocks=4\]") for v in (0, -1, 5, 2.0, "2", True)],
    ("mlp", "method", "spt", r"choose one of \['dense', 'routed', 'deft', 'ada_deft', 'off'\]"),
    ("mlp", "gate", "softmax", r"choose one of \['sigmoid2p', 'none'\]"),
    ("mlp", "block_order", "random", r"choose one of \['contiguous', 'clustered'\]"),
    *[("mlp", "recompute", v, "must be True or False") for v in (1, "yes", None)],
]


def _check_error(error, where, value, valid):
    message = str(error.value)
    assert message.startswith(f"sparsify: {where}={value!r} is not valid;"), message
    assert error.match(valid)


@pytest.mark.parametrize("section,name,value,valid", BAD_FIELDS)
def test_bad_field_fails_when_options_are_made(section, name, value, valid):
    where = f"options.{section}.{name}"
    with pytest.raises((ValueError, TypeError)) as error:
        SparsifyConfig.from_options({section: {name: value}})
    _check_error(error, where, value, valid)
    # direct construction checks the same way, and so does dataclasses.replace
    cls = AttentionConfig if section == "attention" else MLPConfig
    with pytest.raises((ValueError, TypeError)) as error:
        cls(**{name: value})
    _check_error(error, where, value, valid)
    with pytest.raises((ValueError, TypeError)) as error:
        dataclasses.replace(cls(), **{name: value})
    _check_error(error, where, value, valid)


@pytest.mark.parametrize("value", ["4", 2.0, True, [2]])
def test_wrong_type_for_an_int_is_a_type_error(value):
    with pytest.raises(TypeError, match="options.mlp.top_k"):
        MLPConfig(top_k=value)


def test_top_k_is_bounded_by_blocks():
    assert MLPConfig(blocks=8, top_k=8).top_k == 8
    assert MLPConfig(blocks=1, top_k=1).top_k == 1
    with pytest.raises(ValueError, match=r"options.mlp.top_k=3 is not valid; must be an int in \[1, blocks=2\]"):
        SparsifyConfig.from_options({"mlp": {"blocks": 2, "top_k": 3}})


def test_good_values_are_accepted_and_normalised():
    attention = AttentionConfig(keep=1, codebook_loss=0, min_seq=0, subspace_dim=1, codewords=2, block_size=16)
    assert attention.keep == 1.0 and isinstance(attention.keep, float)  # a float field accepts an int
    assert isinstance(attention.codebook_loss, float)
    for block_size in (16, 32, 64, 128):
        assert AttentionConfig(block_size=block_size).block_size == block_size
    assert AttentionConfig(keep=1e-6).keep == 1e-6
    assert type(MLPConfig(blocks=np.int64(8)).blocks) is int  # numpy ints are ints (and stored as int)


@pytest.mark.parametrize("options,where,valid", [
    ({"inner": "tvm"}, "options.inner", r"choose one of \['inductor', 'aot_eager', 'eager'\]"),
    ({"inner": 3}, "options.inner", "choose one of"),
    ({"strict": "yes"}, "options.strict", "must be True or False"),
    ({"strict": 1}, "options.strict", "must be True or False"),
    ({"dump": 5}, "options.dump", r"directory path \(str or os.PathLike\) or None"),
    ({"dump": b"/tmp"}, "options.dump", "directory path"),
    ({"exclude": 5}, "options.exclude", "fnmatch pattern string or a list of them"),
    ({"exclude": ["decoder.*", 3]}, "options.exclude", "3 is not a string"),
    ({"exclude": [None]}, "options.exclude", "None is not a string"),
    ({"attention": 5}, "options.attention", r"method name \['dense', 'spt', 'hsa', 'off'\], None or an instance"),
    ({"attention": MLPConfig()}, "options.attention", "AttentionConfig"),
    ({"mlp": ["routed"]}, "options.mlp", r"method name \['dense', 'routed', 'deft', 'ada_deft', 'off'\]"),
])
def test_bad_top_level_option(options, where, valid):
    with pytest.raises((ValueError, TypeError)) as error:
        SparsifyConfig.from_options(options)
    (name, value), = options.items()
    _check_error(error, where, value, valid)
    with pytest.raises((ValueError, TypeError)) as error:
        SparsifyConfig(**options)
    _check_error(error, where, value, valid)


@pytest.mark.parametrize("section,method", [("attention", "spt"), ("attention", "dense"), ("attention", "off"),
                                            ("mlp", "routed"), ("mlp", "dense"), ("mlp", "off")])
def test_method_name_shorthand(section, method):
    longhand = SparsifyConfig.from_options({section: {"method": method}})
    assert SparsifyConfig.from_options({section: method}) == longhand
    assert SparsifyConfig(**{section: method}) == longhand
    assert dataclasses.replace(SparsifyConfig(), **{section: method}) == longhand


@pytest.mark.parametrize("section,valid", [("attention", r"\['dense', 'spt', 'hsa', 'off'\]"),
                                           ("mlp", r"\['dense', 'routed', 'deft', 'ada_deft', 'off'\]")])
def test_bad_shorthand_names_the_methods(section, valid):
    with pytest.raises(ValueError, match=rf"sparsify: options.{section}.method='sparse' is not valid; choose one of {valid}"):
        SparsifyConfig.from_options({section: "sparse"})


def test_none_section_means_its_defaults():
    assert SparsifyConfig.from_options({"attention": None, "mlp": None}) == SparsifyConfig()
    assert SparsifyConfig(attention=None).attention == AttentionConfig()


def test_dict_sections_in_direct_construction():
    config = SparsifyConfig(attention={"method": "spt", "keep": 0.25}, mlp={"method": "routed", "top_k": 1})
    assert config.attention == AttentionConfig(method="spt", keep=0.25)
    assert config.mlp == MLPConfig(method="routed", top_k=1)
    assert config == SparsifyConfig.from_options({"attention": {"method": "spt", "keep": 0.25},
                                                  "mlp": {"method": "routed", "top_k": 1}})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['kep'\] in options.attention; valid keys"):
        SparsifyConfig(attention={"kep": 0.5})
    with pytest.raises(ValueError, match="options.attention.keep=2.0 is not valid"):
        SparsifyConfig(attention={"keep": 2.0})


def test_replace_keeps_working():
    config = SparsifyConfig.from_options({"attention": "spt", "inner": "aot_eager", "exclude": "decoder.*"})
    dense = dataclasses.replace(config, attention=dataclasses.replace(config.attention, method="dense"))
    assert dense.attention.method == "dense" and dense.inner == "aot_eager" and dense.exclude == ("decoder.*",)
    with pytest.raises(ValueError, match="options.attention.keep=0 is not valid"):
        dataclasses.replace(config.attention, keep=0)


def test_a_config_changed_after_it_was_made_is_checked_again():
    config = SparsifyConfig()
    config.attention.keep = 0  # dataclasses are mutable: from_options looks again
    with pytest.raises(ValueError, match="options.attention.keep=0 is not valid"):
        SparsifyConfig.from_options(config)


def test_dump_accepts_paths(tmp_path, monkeypatch):
    assert SparsifyConfig(dump=tmp_path).dump == str(tmp_path)
    assert SparsifyConfig(dump=str(tmp_path)).dump == str(tmp_path)
    monkeypatch.setenv("SPARSIFY_DUMP", str(tmp_path / "env"))
    assert SparsifyConfig().dump == str(tmp_path / "env")
    monkeypatch.delenv("SPARSIFY_DUMP")
    assert SparsifyConfig().dump is None


def test_exclude_string_is_one_pattern():
    assert SparsifyConfig(exclude="*").exclude == ("*",)
    assert SparsifyConfig.from_options({"exclude": "decoder.*"}).exclude == ("decoder.*",)
    assert SparsifyConfig(exclude=["a.*", "b"]).exclude == ("a.*", "b")
    assert SparsifyConfig(exclude=(p for p in ["a.*"])).exclude == ("a.*",)  # any iterable of strings


def test_exclude_string_skips_only_its_modules():
    """A string pattern used to be iterated per character, so its '*' excluded every region."""
    model = tiny_model("bert", "sdpa")
    compiled = torch.compile(model, backend="sparsify", options={"exclude": "encoder.layer.0*", "inner": "aot_eager"})
    compiled(**tiny_inputs("bert"))
    regions = sparsify.last_report().regions
    skipped = {r.module for r in regions if r.decision == "skipped"}
    assert skipped == {"encoder.layer.0", "encoder.layer.0.attention.self"}, [(r.module, r.decision) for r in regions]
    assert all(r.decision != "skipped" for r in regions if r.module.startswith("encoder.layer.1"))
    assert len(regions) == 4


def test_every_field_has_a_check():
    """validate() is driven by field metadata: a new field without a check would fail here, not pass unchecked."""
    for cls in (SparsifyConfig, AttentionConfig, MLPConfig):
        for f in dataclasses.fields(cls):
            assert callable(f.metadata.get("check")), f"{cls.__name__}.{f.name}"


def test_public_aliases():
    assert SparseAttention is AttentionConfig and RoutedFFN is MLPConfig
    assert sparsify.SparseAttention is AttentionConfig


def test_one_activation_table_keys_every_layer():
    """sparsify/tables.py names the activations; the Triton sources and the routed backward's derivatives must
    cover exactly those names (a new activation added to one layer only would fail here)."""
    from sparsify import tables
    from sparsify.codegen import templates
    from sparsify.codegen.up_projection import ACTIVATIONS as kernel_names
    from sparsify.ops import routed_grouping
    assert tuple(tables.ACTIVATIONS) == kernel_names == tuple(templates.ACTIVATIONS)
    x = torch.linspace(-3, 3, 7, dtype=torch.float64, requires_grad=True)
    for name, fn in tables.ACTIVATIONS.items():  # the hand-written derivative agrees with autograd's
        (expected,) = torch.autograd.grad(fn(x).sum(), x)
        torch.testing.assert_close(routed_grouping._act_backward(name, torch.ones_like(x), x.detach()), expected)
