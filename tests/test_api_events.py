"""REST API: events, the unmapped-events summary and usage totals."""

from users.services import alias_user

from .api_support import ApiClient, assert_error, assert_page, at, feature, identify, rule, track


def test_it_lists_events_newest_first_with_filters(tenant):
    feature(tenant, "exports")
    rule(tenant, "exports", "Exported")
    user = identify(tenant, "u1")
    alias_user(workspace=tenant.workspace, previous_id="anon-1", user_id="u1", occurred_at=user.created_at)
    track(tenant, "anon-1", "Exported", plan="pro")
    track(tenant, "u2", "Clicked")
    api = ApiClient(tenant)
    events = assert_page(api.get("events").json())
    assert [e["event"] for e in events] == ["Clicked", "Exported", ""], "identify last: received first"
    mapped = api.get("events", {"status": "mapped"}).json()["results"]
    assert [(e["event"], e["user"], e["user_id"]) for e in mapped] == [("Exported", user.pk, "anon-1")]
    assert mapped[0]["properties"] == {"plan": "pro"} and mapped[0]["payload"]["event"] == "Exported"
    unmapped = api.get("events", {"status": "unmapped"}).json()["results"]
    assert [(e["event"], e["unmapped_reason"]) for e in unmapped] == [("Clicked", "no_matching_rule")]
    assert [e["event"] for e in api.get("events", {"event": "Clicked"}).json()["results"]] == ["Clicked"]
    by_user = api.get("events", {"user_id": "u1"}).json()["results"]
    assert {e["event"] for e in by_user} == {"Exported", ""}, "any userId of the user finds its events"
    assert api.get("events", {"user_id": "nobody"}).json()["count"] == 0
    assert_error(api.get("events", {"status": "lost"}), 400, "invalid_request", "status")


def test_it_returns_one_event(tenant):
    track(tenant, "u1", "Clicked", button="buy")
    api = ApiClient(tenant)
    [listed] = api.get("events").json()["results"]
    detail = api.get(f"events/{listed['id']}").json()
    assert detail == listed and detail["status"] == "unmapped" and detail["properties"] == {"button": "buy"}
    assert_error(api.get("events/999999"), 404, "not_found")


def test_it_summarises_unmapped_events_by_name_and_property(tenant):
    track(tenant, "u1", "Report Exported", plan={"tier": "pro"})
    track(tenant, "u1", "Report Exported", plan={"tier": "pro"})
    track(tenant, "u1", "Report Exported", plan={"tier": "free"})
    track(tenant, "u1", "Clicked", button="buy")
    api = ApiClient(tenant)
    body = api.get("events/unmapped/summary").json()
    assert set(body) == {"events", "sampled_events", "properties"}
    assert body["events"] == [
        {"event": "Report Exported", "reason": "no_matching_rule", "count": 3},
        {"event": "Clicked", "reason": "no_matching_rule", "count": 1},
    ]
    assert body["sampled_events"] == 4
    assert body["properties"][0] == {"property": "plan.tier", "value": "pro", "count": 2}
    only = api.get("events/unmapped/summary", {"event": "Clicked"}).json()
    assert only["sampled_events"] == 1 and only["properties"] == [{"property": "button", "value": "buy", "count": 1}]
    assert len(only["events"]) == 2, "the by-name counts always cover every unmapped event"


def test_it_totals_usage_per_user_and_feature_with_filters(tenant, exports_and_seats):
    ada = identify(tenant, "ada")
    track(tenant, "ada", "x", featureId="exports", delta=2, _at=at(2))
    track(tenant, "ada", "x", featureId="exports", delta=3, _at=at(20))
    track(tenant, "ada", "x", featureId="seats", delta=1.5, _at=at(2))
    track(tenant, "bob", "x", featureId="exports", delta=-1, _at=at(2))
    alias_user(workspace=tenant.workspace, previous_id="ada-old", user_id="ada", occurred_at=ada.created_at)
    api = ApiClient(tenant)
    rows = assert_page(api.get("usage").json())
    assert [(r["user_id"], r["feature"], r["total"]) for r in rows] == [
        ("ada", "exports", 5),
        ("ada", "seats", 1.5),
        ("bob", "exports", -1),
    ]
    assert set(rows[0]) == {"user", "user_id", "feature", "total"} and rows[0]["user"] == ada.pk
    by_user = api.get("usage", {"user_id": "ada-old", "feature": "exports"}).json()["results"]
    assert [(r["user_id"], r["total"]) for r in by_user] == [("ada", 5)]
    in_range = api.get("usage", {"feature": "exports", "start": at(1), "end": at(10)}).json()["results"]
    assert [(r["user_id"], r["total"]) for r in in_range] == [("ada", 2), ("bob", -1)]
    assert api.get("usage", {"user_id": "nobody"}).json() == {"count": 0, "next": None, "previous": None, "results": []}
    assert api.get("usage", {"feature": "nope"}).json()["count"] == 0
    assert_error(api.get("usage", {"end": "soon"}), 400, "invalid_request", "end")
    page = api.get("usage", {"page_size": 2}).json()
    assert page["count"] == 3 and len(page["results"]) == 2 and page["next"]
