"""Rollout control over the API (embedded stack): validation errors name the field; pause,
resume, manual rollback of a completed rollout; a device turning unhealthy after the apply;
devices in trading stores deferred until the store closes (PATCH of its trading hours); the
SSE event stream; a canary wave all offline pauses
for lack of evidence until an operator resumes."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import pytest

from agent.health import SimulatedProbe
from control_plane.desired.layers import content_hash
from tests.conftest import start_stack
from tests.integration.test_rollouts import PLAN, _agent, _fleet, _release, _run, _versions, _wait_rollout

pytestmark = pytest.mark.integration


async def test_bad_input_is_refused_with_the_field(tmp_path):
    async with start_stack("embedded-sqlite", tmp_path) as cp:
        await cp.create_store("ES-MAD-0001")
        bad_release = await cp.api.post(
            "/v1/releases", json={"name": "x", "layer": {"config": {}, "extra": 1}}
        )
        assert bad_release.status_code == 422
        assert bad_release.json()["error"]["fields"][0]["field"] == "layer.extra"
        empty = await cp.api.post("/v1/releases", json={"name": "x", "layer": {}})
        assert empty.status_code == 422
        assert "must change something" in empty.json()["error"]["message"]
        policy = await cp.api.post(
            "/v1/releases", json={"name": "x", "layer": {"policies": {"bad name!": 1}}}
        )
        assert policy.status_code == 422
        # What the agents' handlers would refuse is refused here, naming the place.
        for layer, message in (
            ({"policies": {"screen_lock_timeout_s": "300"}}, "policies.screen_lock_timeout_s"),
            ({"policies": {"allowed_apps": ["com.example.pos", "no spaces"]}}, "policies.allowed_apps.1"),
            ({"config": {"env": {"pos_currency": "EUR"}}}, "config.env.pos_currency: not a valid name"),
            ({"config": {"env": {"MOTD": "two\nlines"}}}, "config.env.MOTD contains a newline"),
        ):
            refused = await cp.api.post("/v1/releases", json={"name": "x", "layer": layer})
            assert refused.status_code == 422, layer
            assert message in refused.json()["error"]["message"], refused.text
        # A null deletes (env variable or policy); unknown policy names are the agents' business.
        await _release(
            cp,
            "r-deletes",
            {"config": {"env": {"OLD": None}}, "policies": {"kiosk_mode": None, "vendor_x": 1}},
        )
        bad_store = await cp.api.put("/v1/stores/ES-MAD-0001/config", json={"policies": {"usb_storage": 1}})
        assert bad_store.status_code == 422
        assert bad_store.json()["error"]["fields"][0]["field"] == "policies"
        await _release(cp, "r1", {"config": {"a": 1}})

        async def create(**changes):
            body = {"release_id": "r1", "selector": {"stores": ["ES-MAD-0001"]}, "plan": {}, **changes}
            return await cp.api.post("/v1/rollouts", json=body)

        response = await create(plan={"waves": [{"percent": 50}]})
        assert response.status_code == 422
        assert response.json()["error"]["fields"][0]["field"] == "plan.waves"
        response = await create(plan={"waves": [{"percent": 10, "count": 3}, {"percent": 100}]})
        assert response.status_code == 422
        response = await create(selector={})
        assert response.status_code == 422
        assert "empty selector" in response.json()["error"]["message"]
        response = await create(release_id="nope")
        assert response.status_code == 422
        assert "release 'nope' does not exist" in response.json()["error"]["message"]
        response = await create()  # the store has no devices
        assert response.status_code == 422
        assert "matches no active device" in response.json()["error"]["message"]
        response = await create(start_at="2026-12-24T02:00:00")
        assert response.status_code == 422
        response = await create(plan={"maintenance_hours": {"mon": [["05:00", "02:00"]]}})
        assert response.status_code == 422
        assert (await cp.api.get("/v1/rollouts/nope")).status_code == 404
        assert (await cp.api.post("/v1/rollouts/nope/pause")).status_code == 404
        assert (await cp.anonymous.get("/v1/rollouts")).status_code == 401


async def test_pause_resume_and_manual_rollback_of_a_completed_rollout(tmp_path):
    async with start_stack("embedded-sqlite", tmp_path, rollout_tick_s=0.1) as cp:
        fleet = await _fleet(cp, tmp_path, 3)
        await _release(cp, "r-ok", {"config": {"pos": {"tip": True}}})
        body = {
            "id": "ro-ctl",
            "release_id": "r-ok",
            "selector": {"devices": [e.device_id for e in fleet]},
            "plan": {**PLAN, "bake_s": 1.5},
        }
        async with _run([_agent(e) for e in fleet]) as agents:
            # Overlapping rollouts are refused while one is unfinished.
            assert (await cp.api.post("/v1/rollouts", json=body)).status_code == 201
            again = await cp.api.post("/v1/rollouts", json={**body, "id": "ro-other"})
            assert again.status_code == 409
            paused = await cp.api.post("/v1/rollouts/ro-ctl/pause")
            assert paused.json()["state"] == "paused"
            await asyncio.sleep(2.5)  # paused: the canary (if sent) bakes, nothing more is sent
            view = (await cp.api.get("/v1/rollouts/ro-ctl")).json()
            assert view["waves"][1]["states"] == {"queued": 2}
            # Paused before or after the driver started it: resumed, it is scheduled or running.
            resumed = (await cp.api.post("/v1/rollouts/ro-ctl/resume")).json()["state"]
            assert resumed in {"scheduled", "running"}
            await _wait_rollout(cp, "ro-ctl", {"completed"})
            for agent in agents:
                assert agent.applied_version == 2

            rolled = await cp.api.post("/v1/rollouts/ro-ctl/rollback")
            assert rolled.status_code == 200
            view = await _wait_rollout(cp, "ro-ctl", {"rolled_back"})
            assert view["states"] == {"rolled_back": 3}
            for agent, enrolled in zip(agents, fleet, strict=True):
                await asyncio.wait_for(agent.wait_applied(3), 15)
                assert json.loads(enrolled.config_file.read_text()) == {"pos": {"currency": "EUR"}}
                assert await _versions(cp, enrolled.device_id) == [1, 2, 3]
            # Versions 1 and 3 carry the same content: a rollback is a newer version, old content.
            async with cp.control_plane.services.engine.connect() as conn:
                from control_plane.db.schema import desired_states

                docs = {
                    row.version: row.document
                    for row in await conn.execute(
                        desired_states.select().where(desired_states.c.device_id == fleet[0].device_id)
                    )
                }
            assert content_hash(docs[1]["config"]) == content_hash(docs[3]["config"])
            assert (await cp.api.post("/v1/rollouts/ro-ctl/abort")).status_code == 409
        audit = await cp.control_plane.services.audit.records(action="rollout.rollback")
        assert [r["target"] for r in audit] == ["ro-ctl"]


async def test_a_rollout_paused_before_its_start_resumes_as_scheduled(tmp_path):
    async with start_stack("embedded-sqlite", tmp_path, rollout_tick_s=0.1) as cp:
        fleet = await _fleet(cp, tmp_path, 1)
        await _release(cp, "r-later", {"config": {"pos": {"tip": True}}})
        start_at = datetime.now(UTC) + timedelta(seconds=2)
        body = {
            "id": "ro-later",
            "release_id": "r-later",
            "selector": {"devices": [fleet[0].device_id]},
            "plan": PLAN,
            "start_at": start_at.isoformat(),
        }
        async with _run([_agent(fleet[0])]) as [agent]:
            assert (await cp.api.post("/v1/rollouts", json=body)).json()["state"] == "scheduled"
            assert (await cp.api.post("/v1/rollouts/ro-later/pause")).json()["state"] == "paused"
            resumed = (await cp.api.post("/v1/rollouts/ro-later/resume")).json()
            assert resumed["state"] == "scheduled"  # not running without having started
            view = await _wait_rollout(cp, "ro-later", {"completed", "paused", "rolled_back"})
            assert view["state"] == "completed", view
            events = (await cp.api.get("/v1/rollouts/ro-later/events")).json()
            [started] = [e for e in events if e["kind"] == "started"]
            assert datetime.fromisoformat(started["at"]) >= start_at  # its start time was kept
            assert agent.applied_version == 2


async def test_an_offline_canary_pauses_the_rollout_until_the_operator_waives_the_evidence(tmp_path):
    async with start_stack("embedded-sqlite", tmp_path, rollout_tick_s=0.1) as cp:
        fleet = await _fleet(cp, tmp_path, 2)
        await _release(cp, "r-blind", {"config": {"pos": {"tip": True}}})
        body = {
            "id": "ro-blind",
            "release_id": "r-blind",
            "selector": {"stores": ["NL-AMS-0001"]},
            "plan": {**PLAN, "offline_skip_after_s": 1.5, "on_failure": "abort"},
        }
        [canary] = (await cp.api.post("/v1/rollouts/plan", json=body)).json()["waves"][0]["devices"]
        [other] = [e for e in fleet if e.device_id != canary]
        # The canary is enrolled but never comes online; the other device runs.
        async with _run([_agent(other)]) as [agent]:
            assert (await cp.api.post("/v1/rollouts", json=body)).status_code == 201
            await _wait_rollout(cp, "ro-blind", {"running"})
            # Paused and resumed by hand before the canary's deadline: nothing is waived.
            assert (await cp.api.post("/v1/rollouts/ro-blind/pause")).json()["state"] == "paused"
            resumed = (await cp.api.post("/v1/rollouts/ro-blind/resume")).json()
            assert resumed["waves"][0]["states"] == {"queued": 1}
            assert resumed["evidence_waived_wave"] is None

            view = await _wait_rollout(cp, "ro-blind", {"paused", "completed", "rolled_back"})
            assert view["state"] == "paused", view
            assert view["reason"] == (
                "no evidence: every device of wave 0 was skipped (offline); resume to continue without it"
            )
            assert view["current_wave"] == 0
            assert view["waves"][1]["states"] == {"queued": 1}  # the next wave did not start blind
            events = (await cp.api.get("/v1/rollouts/ro-blind/events")).json()
            [paused] = [e["detail"] for e in events if e["kind"] == "paused"]
            assert (paused["code"], paused["skipped"]) == ("no_evidence", 1)
            assert await _versions(cp, other.device_id) == [1]

            resumed = (await cp.api.post("/v1/rollouts/ro-blind/resume")).json()
            assert resumed["state"] == "running"
            assert resumed["evidence_waived_wave"] == 0
            assert resumed["reason"].endswith("missing evidence waived through wave 0")
            view = await _wait_rollout(cp, "ro-blind", {"completed", "paused", "rolled_back"})
            assert view["state"] == "completed", view
            assert [w["states"] for w in view["waves"]] == [{"skipped": 1}, {"healthy": 1}]
            assert agent.applied_version == 2
            assert await _versions(cp, canary) == [1]
        audit = await cp.control_plane.services.audit.records(action="rollout.resume")
        assert [r["detail"] for r in audit] == [{"evidence_waived_wave": 0}, {}]  # newest first


async def test_a_device_unhealthy_after_the_apply_fails_the_canary(tmp_path):
    async with start_stack("embedded-sqlite", tmp_path, rollout_tick_s=0.1) as cp:
        fleet = await _fleet(cp, tmp_path, 3)
        await _release(cp, "r-sick", {"config": {"pos": {"memory_hog": True}}})
        body = {
            "id": "ro-sick",
            "release_id": "r-sick",
            "selector": {"stores": ["NL-AMS-0001"]},
            "plan": {**PLAN, "bake_s": 3},
        }
        [canary] = (await cp.api.post("/v1/rollouts/plan", json=body)).json()["waves"][0]["devices"]
        probes = {e.device_id: SimulatedProbe(i) for i, e in enumerate(fleet)}
        async with _run([_agent(e, probe=probes[e.device_id]) for e in fleet]) as agents:
            by_id = {a.device_id: a for a in agents}
            assert (await cp.api.post("/v1/rollouts", json=body)).status_code == 201
            await asyncio.wait_for(by_id[canary].wait_applied(2), 15)
            probes[canary].healthy = False  # the release makes it sick
            view = await _wait_rollout(cp, "ro-sick", {"rolled_back", "completed"})
            assert view["state"] == "rolled_back"
            devices = (await cp.api.get("/v1/rollouts/ro-sick/devices")).json()
            assert {d["device_id"]: d["state"] for d in devices}[canary] == "rolled_back"
            events = (await cp.api.get("/v1/rollouts/ro-sick/events")).json()
            failed = [d for e in events if e["kind"] == "devices" for d in e["detail"].get("devices", [])]
            assert failed == [{"device_id": canary, "state": "failed", "reason": "unhealthy after apply"}]
            await asyncio.wait_for(by_id[canary].wait_applied(3), 15)


async def test_a_release_whose_result_agents_would_refuse_is_shown_in_the_plan_and_refused(tmp_path):
    async with start_stack("embedded-sqlite", tmp_path) as cp:
        # Kiosks of one store are locked to an app by their store layer; the other store's are not.
        fleet = await _fleet(cp, tmp_path, 2)  # NL-AMS-0001
        locked = await cp.create_store("NL-UTR-0001", policies={"kiosk_app": "com.example.kiosk"})
        from tests.support.agents import enroll_agent

        utrecht = await enroll_agent(cp, locked["id"], tmp_path / "utrecht")
        await _release(cp, "r-kiosk", {"policies": {"kiosk_mode": True}})
        everyone = {
            "release_id": "r-kiosk",
            "selector": {"stores": ["NL-AMS-0001", "NL-UTR-0001"]},
            "plan": {**PLAN, "waves": [{"percent": 100}]},
        }
        plan = (await cp.api.post("/v1/rollouts/plan", json=everyone)).json()
        assert plan["refused"] == [
            {
                "devices": 2,
                "example_device": min(a.device_id for a in fleet),
                "field": "policies",
                "message": "policies: Value error, kiosk_mode needs kiosk_app",
            }
        ]
        created = await cp.api.post("/v1/rollouts", json={**everyone, "id": "ro-kiosk"})
        assert created.status_code == 422
        assert created.json()["error"]["code"] == "refused_by_agents"
        assert "2 targeted devices" in created.json()["error"]["message"]
        assert (await cp.api.get("/v1/rollouts/ro-kiosk")).status_code == 404
        # The store whose devices can take it: planned clean, created.
        utrecht_only = {**everyone, "id": "ro-kiosk-utr", "selector": {"stores": ["NL-UTR-0001"]}}
        assert (await cp.api.post("/v1/rollouts/plan", json=utrecht_only)).json()["refused"] == []
        assert (await cp.api.post("/v1/rollouts", json=utrecht_only)).status_code == 201
        devices = (await cp.api.get("/v1/rollouts/ro-kiosk-utr/devices")).json()
        assert [d["device_id"] for d in devices] == [utrecht.device_id]


async def test_store_fields_are_patched_under_if_match_and_bad_input_is_refused(tmp_path):
    async with start_stack("embedded-sqlite", tmp_path) as cp:
        await cp.create_store("IT-ROM-0001", timezone="Europe/Rome")
        etag = (await cp.api.get("/v1/stores/IT-ROM-0001")).headers["etag"]
        for body, field in (
            ({}, None),
            ({"trading_hours": {"mon-fri": "09:00-18:00"}}, "trading_hours"),  # sat, sun unsaid
            ({"timezone": "Europe/Rom"}, "timezone"),
            ({"timezone": None}, None),
            ({"name": "x", "colour": "red"}, "colour"),
        ):
            refused = await cp.api.patch("/v1/stores/IT-ROM-0001", json=body)
            assert refused.status_code == 422, body
            if field is not None:
                assert refused.json()["error"]["fields"][0]["field"] == field
        changed = await cp.api.patch(
            "/v1/stores/IT-ROM-0001",
            json={"name": "Roma Termini", "trading_hours": {"mon-sat": "08:00-21:00", "sun": "closed"}},
            headers={"If-Match": etag},
        )
        assert changed.status_code == 200, changed.text
        view = changed.json()
        assert view["name"] == "Roma Termini"
        assert view["trading_hours"]["mon"] == [["08:00", "21:00"]]
        assert view["trading_hours"]["sun"] == []
        assert changed.headers["etag"] != etag
        stale = await cp.api.patch(
            "/v1/stores/IT-ROM-0001", json={"region": "it"}, headers={"If-Match": etag}
        )
        assert stale.status_code == 412
        # The configuration layer shares the store's ETag: a stale config write is refused too.
        stale_config = await cp.api.put(
            "/v1/stores/IT-ROM-0001/config", json={"config": {"a": 1}}, headers={"If-Match": etag}
        )
        assert stale_config.status_code == 412
        cleared = (await cp.api.patch("/v1/stores/IT-ROM-0001", json={"trading_hours": None})).json()
        assert cleared["trading_hours"] is None
        assert cleared["name"] == "Roma Termini"
        missing = await cp.api.patch("/v1/stores/XX-NOPE-0001", json={"name": "x"})
        assert missing.status_code == 404
        records = await cp.control_plane.services.audit.records(limit=50)
        assert [r["detail"] for r in reversed(records) if r["action"] == "store.update"] == [
            {"name": "Roma Termini", "trading_hours": view["trading_hours"]},
            {"trading_hours": None},
        ]


async def test_trading_stores_are_deferred_and_move_when_the_store_closes(tmp_path):
    async with start_stack("embedded-sqlite", tmp_path, rollout_tick_s=0.1) as cp:
        await cp.create_store("IT-ROM-0001", timezone="Europe/Rome")
        opened = await cp.api.patch(
            "/v1/stores/IT-ROM-0001", json={"trading_hours": {"daily": "00:00-24:00"}}
        )
        assert opened.status_code == 200, opened.text
        fleet = await _fleet(cp, tmp_path, 1)  # NL-AMS-0001: no trading hours → always in window
        from tests.support.agents import enroll_agent

        rome = await enroll_agent(cp, "IT-ROM-0001", tmp_path / "rome")
        await _release(cp, "r-win", {"config": {"late": True}})
        body = {
            "id": "ro-win",
            "release_id": "r-win",
            "selector": {"stores": ["NL-AMS-0001", "IT-ROM-0001"]},
            "plan": {**PLAN, "window": "closed_hours", "waves": [{"percent": 100}], "bake_s": 0.5},
        }
        plan = (await cp.api.post("/v1/rollouts/plan", json=body)).json()
        assert plan["waves"][0]["deferred"] == [rome.device_id]
        async with _run([_agent(e) for e in [*fleet, rome]]):
            assert (await cp.api.post("/v1/rollouts", json=body)).status_code == 201
            seen: list[str] = []
            async with cp.api.stream("GET", "/v1/rollouts/ro-win/events/stream") as stream:
                async for line in stream.aiter_lines():
                    if line.startswith("data: "):
                        event = json.loads(line[6:])
                        seen.append(event["kind"])
                        if event["kind"] == "devices" and event["detail"]["counts"].get("healthy"):
                            break
            assert seen[0] == "created"
            view = (await cp.api.get("/v1/rollouts/ro-win")).json()
            # The open store's device waits; the other finished; the rollout does not complete.
            assert view["state"] == "running"
            assert view["states"] == {"deferred": 1, "healthy": 1}
            assert await _versions(cp, rome.device_id) == [1]

            # The store closes (a holiday): its device moves on the next tick; the rollout ends.
            closed = await cp.api.patch("/v1/stores/IT-ROM-0001", json={"trading_hours": {"daily": "closed"}})
            assert closed.status_code == 200, closed.text
            view = await _wait_rollout(cp, "ro-win", {"completed", "paused", "rolled_back"})
            assert view["state"] == "completed"
            assert view["states"] == {"healthy": 2}
            assert await _versions(cp, rome.device_id) == [1, 2]


async def test_a_rollout_can_target_static_and_dynamic_groups(tmp_path):
    async with start_stack("embedded-sqlite", tmp_path) as cp:
        fleet = await _fleet(cp, tmp_path, 4)
        tagged, listed = fleet[0].device_id, fleet[1].device_id
        assert (await cp.api.put(f"/v1/devices/{tagged}/tags", json={"tags": ["pilot"]})).status_code == 200
        for group in (
            {"id": "pilots", "name": "Pilots", "kind": "dynamic", "selector": {"tag": ["pilot"]}},
            {"id": "hand-picked", "name": "Hand-picked", "kind": "static"},
        ):
            assert (await cp.api.post("/v1/groups", json=group)).status_code == 201
        added = await cp.api.post("/v1/groups/hand-picked/members", json={"device_ids": [listed]})
        assert added.status_code in (200, 201), added.text
        await _release(cp, "r-groups", {"config": {"pilot": True}})
        body = {
            "id": "ro-groups",
            "release_id": "r-groups",
            "selector": {"groups": ["pilots", "hand-picked", "no-such-group"]},
            "plan": {"waves": [{"percent": 100}]},
        }
        plan = (await cp.api.post("/v1/rollouts/plan", json=body)).json()
        assert sorted(plan["waves"][0]["devices"]) == sorted([tagged, listed])
