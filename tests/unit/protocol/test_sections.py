"""The handler rules shared by agent and control plane: a layer (merge patch) and a merged
document are judged the way the agent's handlers judge what they apply."""

from __future__ import annotations

import pytest

from protocol.sections import SectionError, check_document, check_patch


@pytest.mark.parametrize(
    ("policies", "config", "field"),
    [
        ({"screen_lock_timeout_s": "300"}, {}, "policies.screen_lock_timeout_s"),
        ({"screen_lock_timeout_s": 86_401}, {}, "policies.screen_lock_timeout_s"),
        ({"usb_storage": 0}, {}, "policies.usb_storage"),
        ({"allowed_apps": ["ok.app", "not ok"]}, {}, "policies.allowed_apps.1"),
        ({"kiosk_app": ""}, {}, "policies.kiosk_app"),
        ({}, {"env": ["A=1"]}, "config.env"),
        ({}, {"env": {"lower": "x"}}, "config.env.lower"),
        ({}, {"env": {"A": 1}}, "config.env.A"),
        ({}, {"env": {"A": "x" * 4097}}, "config.env.A"),
    ],
)
def test_a_layer_setting_a_value_the_agent_refuses_is_refused_with_its_place(policies, config, field):
    with pytest.raises(SectionError) as refused:
        check_patch(policies, config)
    assert refused.value.field == field
    assert field in refused.value.message


def test_deletions_unknown_policies_and_cross_layer_rules_are_left_to_the_merged_result():
    check_patch(
        {"kiosk_mode": True, "screen_lock_timeout_s": None, "vendor_x": {"any": "thing"}},
        {"env": {"OLD": None, "NEW": "1"}, "pos": {"anything": [1, 2]}},
    )
    check_patch({}, {"env": None})  # the whole env deleted


def test_the_merged_result_is_judged_whole():
    check_document({"kiosk_mode": True, "kiosk_app": "pos.app", "vendor_x": 1}, {"env": {"A": "1"}})
    with pytest.raises(SectionError, match="kiosk_mode needs kiosk_app"):
        check_document({"kiosk_mode": True}, {})
    with pytest.raises(SectionError, match="kiosk_app must be one of allowed_apps"):
        check_document({"kiosk_app": "a.b", "allowed_apps": ["c.d"]}, {})
    with pytest.raises(SectionError, match="at most 256"):
        check_document({}, {"env": {f"V{i}": "x" for i in range(257)}})
    with pytest.raises(SectionError, match="must be a string"):
        check_document({}, {"env": {"A": None}})  # in a document (not a patch) null is no string
