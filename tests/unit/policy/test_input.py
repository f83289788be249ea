"""build_input: the opa-envoy-plugin document shape plus ``meshgate`` (CONTRACT 5)."""

from __future__ import annotations

from policy.input import RequestFacts, build_input, parse_path, parse_query


def facts(**overrides: object) -> RequestFacts:
    values: dict[str, object] = {
        "method": "GET",
        "path": "/orders/1",
        "query": "x=1",
        "host": "orders",
        "scheme": "http",
        "protocol": "HTTP/1.1",
        "headers": [("Accept", "a"), ("X-Multi", "1"), ("x-multi", "2")],
        "request_id": "rid",
        "source": ("127.0.0.1", 51234),
        "destination": ("127.0.0.1", 8080),
        "service": "orders",
        "route": "orders-read",
        "principal": {"sub": "alice"},
    }
    values.update(overrides)
    return RequestFacts(**values)  # type: ignore[arg-type]


def test_contract_shape() -> None:
    assert build_input(facts()) == {
        "attributes": {
            "source": {"address": {"socketAddress": {"address": "127.0.0.1", "portValue": 51234}}},
            "destination": {"address": {"socketAddress": {"address": "127.0.0.1", "portValue": 8080}}},
            "request": {
                "http": {
                    "id": "rid",
                    "method": "GET",
                    "path": "/orders/1?x=1",
                    "host": "orders",
                    "scheme": "http",
                    "protocol": "HTTP/1.1",
                    "headers": {"accept": "a", "x-multi": "1,2"},
                }
            },
        },
        "parsed_path": ["orders", "1"],
        "parsed_query": {"x": ["1"]},
        "parsed_body": None,
        "meshgate": {"service": "orders", "route": "orders-read", "principal": {"sub": "alice"}},
    }


def test_no_query_no_question_mark_and_null_principal() -> None:
    document = build_input(facts(query="", principal=None))
    assert document["attributes"]["request"]["http"]["path"] == "/orders/1"
    assert document["parsed_query"] == {}
    assert document["meshgate"]["principal"] is None


def test_parsed_path_like_opa_envoy_plugin() -> None:
    assert parse_path("/") == [""]
    assert parse_path("/a/b%20c/") == ["a", "b c", ""]


def test_parsed_query_like_go_parse_query() -> None:
    assert parse_query("a=1&a=2&b&c=x+y") == {"a": ["1", "2"], "b": [""], "c": ["x y"]}
    assert parse_query("a=1;b=2") == {"a": ["1;b=2"]}  # ";" is not a separator (Go >= 1.17)


def test_the_verified_mesh_peer_is_the_source_principal() -> None:
    document = build_input(facts(peer="spiffe://meshgate.local/service/orders"))
    assert document["attributes"]["source"]["principal"] == "spiffe://meshgate.local/service/orders"
    # As opa-envoy-plugin: absent (not "" or null) when the caller proved no identity.
    assert "principal" not in build_input(facts())["attributes"]["source"]
