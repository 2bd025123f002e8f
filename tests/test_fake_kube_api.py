"""The stand-in API server (tests/fake_kube_api.py) checked against the specifications, so that
it cannot be kinder than the real thing: RFC 7386's and RFC 6902's own examples, the strategic
merge patch examples of the Kubernetes documentation ("Update API Objects in Place Using kubectl
patch"), and the server's answers over HTTPS (Status objects, 409, 410, 415, 422, RBAC)."""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from certs.pki import PKIPaths
from tests.fake_kube_api import DEPLOYMENT, NS, FakeKubeApi, serve
from tests.kube_patch import (
    BadPatch,
    PatchFailed,
    json_patch,
    merge_patch,
    strategic_merge_patch,
)

# RFC 7386, Appendix A: original, patch, result.
RFC7386_EXAMPLES: list[tuple[Any, Any, Any]] = [
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
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
    # Section 3's example.
    (
        {"title": "Goodbye!", "author": {"givenName": "John", "familyName": "Doe"},
         "tags": ["example", "sample"], "content": "This will be unchanged"},
        {"title": "Hello!", "phoneNumber": "+01-123-456-7890", "author": {"familyName": None},
         "tags": ["example"]},
        {"title": "Hello!", "author": {"givenName": "John"}, "tags": ["example"],
         "content": "This will be unchanged", "phoneNumber": "+01-123-456-7890"},
    ),
]  # fmt: skip


@pytest.mark.parametrize(("original", "patch", "result"), RFC7386_EXAMPLES)
def test_merge_patch_follows_rfc7386(original: Any, patch: Any, result: Any) -> None:
    assert merge_patch(original, patch) == result


# RFC 6902, Appendix A: document, patch, result (None: the patch is an error).
RFC6902_EXAMPLES: list[tuple[str, Any, list[dict[str, Any]], Any]] = [
    ("A.1", {"foo": "bar"}, [{"op": "add", "path": "/baz", "value": "qux"}],
     {"baz": "qux", "foo": "bar"}),
    ("A.2", {"foo": ["bar", "baz"]}, [{"op": "add", "path": "/foo/1", "value": "qux"}],
     {"foo": ["bar", "qux", "baz"]}),
    ("A.3", {"baz": "qux", "foo": "bar"}, [{"op": "remove", "path": "/baz"}], {"foo": "bar"}),
    ("A.4", {"foo": ["bar", "qux", "baz"]}, [{"op": "remove", "path": "/foo/1"}],
     {"foo": ["bar", "baz"]}),
    ("A.5", {"baz": "qux", "foo": "bar"}, [{"op": "replace", "path": "/baz", "value": "boo"}],
     {"baz": "boo", "foo": "bar"}),
    ("A.6", {"foo": {"bar": "baz", "waldo": "fred"}, "qux": {"corge": "grault"}},
     [{"op": "move", "from": "/foo/waldo", "path": "/qux/thud"}],
     {"foo": {"bar": "baz"}, "qux": {"corge": "grault", "thud": "fred"}}),
    ("A.7", {"foo": ["all", "grass", "cows", "eat"]},
     [{"op": "move", "from": "/foo/1", "path": "/foo/3"}],
     {"foo": ["all", "cows", "eat", "grass"]}),
    ("A.8", {"baz": "qux", "foo": ["a", 2, "c"]},
     [{"op": "test", "path": "/baz", "value": "qux"}, {"op": "test", "path": "/foo/1", "value": 2}],
     {"baz": "qux", "foo": ["a", 2, "c"]}),
    ("A.9", {"baz": "qux"}, [{"op": "test", "path": "/baz", "value": "bar"}], None),
    ("A.10", {"foo": "bar"}, [{"op": "add", "path": "/child", "value": {"grandchild": {}}}],
     {"foo": "bar", "child": {"grandchild": {}}}),
    ("A.11", {"foo": "bar"}, [{"op": "add", "path": "/baz", "value": "qux", "xyz": 123}],
     {"foo": "bar", "baz": "qux"}),
    ("A.12", {"foo": "bar"}, [{"op": "add", "path": "/baz/bat", "value": "qux"}], None),
    ("A.14", {"/": 9, "~1": 10}, [{"op": "test", "path": "/~01", "value": 10}],
     {"/": 9, "~1": 10}),
    ("A.15", {"/": 9, "~1": 10}, [{"op": "test", "path": "/~01", "value": "10"}], None),
    ("A.16", {"foo": ["bar"]}, [{"op": "add", "path": "/foo/-", "value": ["abc", "def"]}],
     {"foo": ["bar", ["abc", "def"]]}),
]  # fmt: skip


@pytest.mark.parametrize(
    ("section", "document", "patch", "result"),
    RFC6902_EXAMPLES,
    ids=[e[0] for e in RFC6902_EXAMPLES],
)
def test_json_patch_follows_rfc6902(
    section: str, document: Any, patch: list[dict[str, Any]], result: Any
) -> None:
    if result is None:
        with pytest.raises(PatchFailed):
            json_patch(document, patch)
    else:
        assert json_patch(document, patch) == result
    # A.13 (a member given twice) is about JSON parsing; a patch that is not a list is a 400:
    with pytest.raises(BadPatch):
        json_patch(document, {"op": "add"})


def _pod(*containers: dict[str, Any]) -> dict[str, Any]:
    return {"spec": {"template": {"spec": {"containers": list(containers)}}}}


NGINX = {"name": "patch-demo-ctr", "image": "nginx"}
REDIS = {"name": "patch-demo-ctr-2", "image": "redis"}


def test_strategic_merge_merges_containers_by_name_where_merge_patch_replaces() -> None:
    # The Kubernetes documentation's example: the same body, two patch types.
    original = _pod(NGINX)
    assert strategic_merge_patch(original, _pod(REDIS)) == _pod(NGINX, REDIS)
    assert merge_patch(original, _pod(REDIS)) == _pod(REDIS)  # the list replaced: one left
    changed = strategic_merge_patch(_pod(NGINX, REDIS), _pod({"name": "patch-demo-ctr-2",
                                                              "image": "redis:7"}))  # fmt: skip
    assert changed == _pod(NGINX, {"name": "patch-demo-ctr-2", "image": "redis:7"})


def test_strategic_merge_replaces_lists_without_a_merge_strategy() -> None:
    # tolerations have no patchStrategy: the documentation's example replaces them.
    original = {"spec": {"tolerations": [{"effect": "NoSchedule", "key": "dedicated",
                                          "value": "test-team"}]}}  # fmt: skip
    patch = {"spec": {"tolerations": [{"effect": "NoSchedule", "key": "disktype",
                                       "value": "ssd"}]}}  # fmt: skip
    assert strategic_merge_patch(original, patch) == patch


def test_strategic_merge_directives() -> None:
    both = _pod(NGINX, REDIS)
    delete = _pod({"name": "patch-demo-ctr", "$patch": "delete"})
    assert strategic_merge_patch(both, delete) == _pod(REDIS)
    replace = _pod({"$patch": "replace"}, REDIS)
    assert strategic_merge_patch(both, replace) == _pod(REDIS)
    order = {"spec": {"template": {"spec": {
        "$setElementOrder/containers": [{"name": "patch-demo-ctr-2"}, {"name": "patch-demo-ctr"}],
    }}}}  # fmt: skip
    assert strategic_merge_patch(both, order) == _pod(REDIS, NGINX)
    assert strategic_merge_patch({"a": {"b": 1}}, {"a": {"$patch": "delete"}}) == {}
    assert strategic_merge_patch({"a": {"b": 1, "c": 2}}, {"a": {"$patch": "replace", "d": 3}}) == {
        "a": {"d": 3}
    }
    fin = {"metadata": {"finalizers": ["a", "b"]}}
    assert strategic_merge_patch(fin, {"metadata": {"finalizers": ["c"]}}) == {
        "metadata": {"finalizers": ["a", "b", "c"]}
    }
    assert strategic_merge_patch(
        fin, {"metadata": {"$deleteFromPrimitiveList/finalizers": ["a"]}}
    ) == {"metadata": {"finalizers": ["b"]}}
    with pytest.raises(BadPatch, match="merge key"):
        strategic_merge_patch(both, _pod({"image": "no-name"}))
    with pytest.raises(BadPatch, match="retainKeys"):
        strategic_merge_patch(both, {"spec": {"$retainKeys": ["template"]}})


# -- over HTTPS ----------------------------------------------------------------------------

TOKEN = "token-a"


@pytest.fixture
async def api(pki: PKIPaths) -> AsyncIterator[tuple[FakeKubeApi, httpx.AsyncClient]]:
    fake = FakeKubeApi(tokens={TOKEN})
    async with serve(fake, str(pki.server_cert), str(pki.server_key)) as url:
        client = httpx.AsyncClient(
            base_url=url,
            verify=ssl.create_default_context(cafile=str(pki.server_ca_cert)),
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        async with client:
            yield fake, client


PATH = f"/apis/apps/v1/namespaces/{NS}/deployments/{DEPLOYMENT}"


async def _patch(
    client: httpx.AsyncClient, kind: str, body: object, path: str = PATH
) -> httpx.Response:
    return await client.patch(path, content=json.dumps(body), headers={"Content-Type": kind})


async def test_a_merge_patch_with_one_container_drops_the_others_as_a_real_server_does(
    api: tuple[FakeKubeApi, httpx.AsyncClient],
) -> None:
    fake, client = api
    one = {"spec": {"template": {"spec": {"containers": [{"name": "querynode", "image": "x:2"}]}}}}
    answer = await _patch(client, "application/merge-patch+json", one)
    assert answer.status_code == 200
    containers = fake.get("deployments", DEPLOYMENT)["spec"]["template"]["spec"]["containers"]
    assert containers == [{"name": "querynode", "image": "x:2"}]  # the sidecar is gone


async def test_errors_are_status_objects(api: tuple[FakeKubeApi, httpx.AsyncClient]) -> None:
    fake, client = api
    rv = fake.get("deployments", DEPLOYMENT)["metadata"]["resourceVersion"]
    stale = {"metadata": {"resourceVersion": str(int(rv) - 1)}, "spec": {"replicas": 3}}
    conflict = await _patch(client, "application/strategic-merge-patch+json", stale)
    assert conflict.status_code == 409
    assert (conflict.json()["kind"], conflict.json()["reason"]) == ("Status", "Conflict")
    failed = await _patch(client, "application/json-patch+json",
                          [{"op": "test", "path": "/spec/replicas", "value": 7}])  # fmt: skip
    assert (failed.status_code, failed.json()["reason"]) == (422, "Invalid")
    crd = f"/apis/milvus.io/v1beta1/namespaces/{NS}/milvuses/my-milvus"
    smp = await _patch(client, "application/strategic-merge-patch+json", {"spec": {}}, crd)
    assert (smp.status_code, smp.json()["reason"]) == (415, "UnsupportedMediaType")
    missing = await client.get(PATH + "-nope")
    assert (missing.status_code, missing.json()["reason"]) == (404, "NotFound")
    anonymous = await client.get(PATH, headers={"Authorization": "Bearer other"})
    assert (anonymous.status_code, anonymous.json()["reason"]) == (401, "Unauthorized")
    empty = await _patch(client, "application/merge-patch+json",
                         {"spec": {"template": {"spec": {"containers": []}}}})  # fmt: skip
    assert (empty.status_code, empty.json()["reason"]) == (422, "Invalid")
    assert fake.get("deployments", DEPLOYMENT)["metadata"]["resourceVersion"] == rv  # untouched


async def test_rbac_is_judged_like_the_authorizer(
    api: tuple[FakeKubeApi, httpx.AsyncClient],
) -> None:
    fake, client = api
    fake.rules = [{"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "watch"],
                   "resourceNames": [DEPLOYMENT]}]  # fmt: skip
    assert (await client.get(PATH)).status_code == 200
    listed = await client.get(f"/apis/apps/v1/namespaces/{NS}/deployments")
    assert listed.status_code == 403  # list is not granted, and resourceNames needs a name
    assert 'cannot list resource "deployments" in API group "apps"' in listed.json()["message"]
    scale = await client.get(PATH + "/scale")
    assert scale.status_code == 403  # a subresource is a resource of its own for RBAC
    assert fake.used_rules == {0}


async def test_a_watch_replays_from_a_version_and_expires_old_ones(
    api: tuple[FakeKubeApi, httpx.AsyncClient],
) -> None:
    fake, client = api
    rv = fake.get("deployments", DEPLOYMENT)["metadata"]["resourceVersion"]
    answer = await _patch(client, "application/merge-patch+json", {"spec": {"replicas": 3}})
    assert answer.json()["metadata"]["generation"] == 2
    watch = f"/apis/apps/v1/namespaces/{NS}/deployments"
    params = {"watch": "true", "resourceVersion": rv, "timeoutSeconds": "0.2",
              "fieldSelector": f"metadata.name={DEPLOYMENT}"}  # fmt: skip
    replayed = [
        json.loads(line) for line in (await client.get(watch, params=params)).text.splitlines()
    ]
    assert replayed[0]["type"] == "MODIFIED"
    assert replayed[0]["object"]["spec"]["replicas"] == 3
    assert replayed[-1]["object"]["status"]["availableReplicas"] == 3  # the controller's steps
    fake.compact()
    expired = (await client.get(watch, params=params)).text.splitlines()
    (event,) = [json.loads(line) for line in expired]
    assert event["type"] == "ERROR"
    assert (event["object"]["code"], event["object"]["reason"]) == (410, "Expired")
