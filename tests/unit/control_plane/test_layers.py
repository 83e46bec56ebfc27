import random

import pytest

from control_plane.desired.layers import (
    content_hash,
    effective_state,
    effective_state_with_provenance,
    merge_patch,
)


@pytest.mark.parametrize(
    ("target", "patch", "expected"),
    [  # RFC 7396 appendix A examples
        ({"a": "b"}, {"a": "c"}, {"a": "c"}),
        ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
        ({"a": "b"}, {"a": None}, {}),
        ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
        ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
        ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
        ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
        ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
        (["a", "b"], ["c", "d"], ["c", "d"]),
        ({"a": "b"}, ["c"], ["c"]),
        ({"a": "foo"}, None, None),
        ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
        ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
        ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
    ],
)
def test_merge_patch_follows_rfc_7396(target, patch, expected):
    assert merge_patch(target, patch) == expected


def test_merge_patch_does_not_mutate_inputs():
    target, patch = {"a": {"b": 1}}, {"a": {"c": 2}}
    merge_patch(target, patch)
    assert target == {"a": {"b": 1}}
    assert patch == {"a": {"c": 2}}


def test_effective_state_layers_lowest_first():
    base = {"config": {"pos": {"currency": "EUR", "tax": 19}}, "policies": {"lock_s": 300}}
    store = {"config": {"pos": {"tax": 7}}, "policies": {"lock_s": None}}
    assert effective_state(base, store) == {
        "config": {"pos": {"currency": "EUR", "tax": 7}},
        "policies": {},
        "checks": {},
    }


def test_content_hash_ignores_key_order_but_not_values():
    assert content_hash({"a": 1, "b": 2}) == content_hash({"b": 2, "a": 1})
    assert content_hash({"a": 1}) != content_hash({"a": 2})


def test_provenance_names_the_last_layer_to_set_each_leaf():
    layers = [
        ("template:t@1", {"config": {"pos": {"tax": 19, "currency": "EUR"}, "flags": ["a"]}}),
        ("store:S", {"config": {"pos": {"tax": 7}, "flags": ["b"]}}),
        ("device:d", {"config": {"pos": {"currency": None}}, "policies": {"lock": {}}}),
    ]
    state, provenance = effective_state_with_provenance(layers)
    assert state == effective_state(*(layer for _, layer in layers))
    assert provenance == {
        "/config/flags": "store:S",
        "/config/pos/tax": "store:S",
        "/policies/lock": "device:d",
    }


def test_provenance_when_a_scalar_becomes_an_object_and_back():
    layers = [
        ("a", {"config": {"x": 1}}),
        ("b", {"config": {"x": {"y": 2}}}),
        ("c", {"config": {"x": {"z": 3}}}),
    ]
    state, provenance = effective_state_with_provenance(layers)
    assert state["config"] == {"x": {"y": 2, "z": 3}}
    assert provenance == {"/config/x/y": "b", "/config/x/z": "c"}

    state, provenance = effective_state_with_provenance([*layers, ("d", {"config": {"x": "flat"}})])
    assert state["config"] == {"x": "flat"}
    assert provenance == {"/config/x": "d"}


def test_provenance_escapes_slashes_and_tildes_in_keys():
    _, provenance = effective_state_with_provenance([("s", {"config": {"a/b": {"c~d": 1}}})])
    assert provenance == {"/config/a~1b/c~0d": "s"}


@pytest.mark.parametrize("seed", range(30))
def test_provenance_merge_equals_the_plain_merge(seed):
    rng = random.Random(seed)

    def value(depth: int) -> object:
        kind = rng.random()
        if depth < 3 and kind < 0.4:
            return {rng.choice("abcd"): value(depth + 1) for _ in range(rng.randint(0, 3))}
        if kind < 0.55:
            return None
        return rng.choice([1, "s", [1, 2], True])

    layers = [(f"l{i}", {"config": value(0) or {}}) for i in range(5)]
    layers = [(source, layer if isinstance(layer["config"], dict) else {}) for source, layer in layers]
    state, provenance = effective_state_with_provenance(layers)
    assert state == effective_state(*(layer for _, layer in layers))
    for pointer in provenance:
        assert pointer.startswith("/config/")
