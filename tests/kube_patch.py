"""The three PATCH bodies of the Kubernetes API, applied the way kube-apiserver applies them.

Pure functions on JSON values, used by the stand-in API server (tests/fake_kube_api.py) and
tested on their own against the specifications' examples (tests/test_fake_kube_api.py):

- ``application/merge-patch+json``: RFC 7386 exactly. A list in the patch *replaces* the list
  in the target, whole: a one-item ``containers`` list leaves one container.
- ``application/json-patch+json``: RFC 6902, by python-json-patch (``jsonpatch``); a failed
  ``test`` or a path that does not exist is a :class:`PatchFailed` (the API server answers 422),
  a body that is not a patch document is a :class:`BadPatch` (400).
- ``application/strategic-merge-patch+json``: Kubernetes' own merge for built-in kinds. Maps
  merge as in RFC 7386; a list merges by its *patch merge key* where the Go type declares
  ``patchStrategy:"merge"`` (``containers`` by ``name``, ``volumeMounts`` by ``mountPath``, ...:
  :data:`MERGE_KEYS`), and is replaced otherwise. Directives: ``$patch: replace|delete|merge``
  in a map or a list item, ``$setElementOrder/<list>``, ``$deleteFromPrimitiveList/<list>``.

Not modelled (a patch that needs them is refused with :class:`BadPatch`, never half-applied):
``$retainKeys``; merge keys of kinds other than a workload's pod template (:data:`MERGE_KEYS` is
keyed by field name, which is unambiguous there; elsewhere the real schema decides); the real
server's element order when no ``$setElementOrder`` is sent (here: the server's items in their
order, then new ones in the patch's order).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Final

import jsonpatch
import jsonpointer

# Lists that k8s.io/api declares patchStrategy "merge", by field name, with their merge key.
# Primitive lists that merge (a set union) have None.
MERGE_KEYS: Final[Mapping[str, str | None]] = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "volumes": "name",
    "env": "name",
    "ports": "containerPort",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "imagePullSecrets": "name",
    "hostAliases": "ip",
    "resourceClaims": "name",
    "ownerReferences": "uid",
    "finalizers": None,
}
DIRECTIVE: Final = "$patch"
ORDER: Final = "$setElementOrder/"
DELETE_PRIMITIVE: Final = "$deleteFromPrimitiveList/"


class BadPatch(ValueError):
    """The body is not a patch of its type (the API server answers 400 Bad Request)."""


class PatchFailed(ValueError):
    """A well-formed patch that cannot be applied to this object (422 Unprocessable Entity)."""


# -- RFC 7386 ------------------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 section 2, as its pseudo-code says: returns the patched value (the inputs are
    not changed)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for name, value in patch.items():
        if value is None:
            result.pop(name, None)
        else:
            result[name] = merge_patch(result.get(name), value)
    return result


# -- RFC 6902 ------------------------------------------------------------------------------


def json_patch(document: Any, operations: Any) -> Any:
    """RFC 6902: the operations in order, all or nothing."""
    if not isinstance(operations, list):
        raise BadPatch("a JSON patch is a list of operations")
    try:
        patch = jsonpatch.JsonPatch(operations)
        return patch.apply(document, in_place=False)
    except jsonpatch.InvalidJsonPatch as exc:
        raise BadPatch(f"invalid JSON patch: {exc}") from exc
    except (jsonpatch.JsonPatchConflict, jsonpatch.JsonPatchTestFailed) as exc:
        raise PatchFailed(str(exc)) from exc
    except jsonpointer.JsonPointerException as exc:
        raise PatchFailed(str(exc)) from exc


# -- strategic merge patch -----------------------------------------------------------------


def strategic_merge_patch(original: Any, patch: Any) -> Any:
    """Kubernetes' strategic merge patch of ``original`` (a built-in kind's object)."""
    if not isinstance(patch, dict):
        raise BadPatch("a strategic merge patch is a JSON object")
    merged = _merge_map(original if isinstance(original, dict) else {}, patch)
    return {} if merged is None else merged


def _merge_map(original: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any] | None:
    directive = patch.get(DIRECTIVE)
    if directive == "delete":
        return None
    if directive == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != DIRECTIVE}
    if directive not in (None, "merge"):
        raise BadPatch(f"unknown patch directive {directive!r}")
    if "$retainKeys" in patch:
        raise BadPatch("$retainKeys is not modelled by the stand-in")
    result = copy.deepcopy(original)
    orders: dict[str, list[Any]] = {}
    for key, value in patch.items():
        if key == DIRECTIVE:
            continue
        if key.startswith(ORDER):
            if not isinstance(value, list):
                raise BadPatch(f"{key} must be a list")
            orders[key[len(ORDER) :]] = value
        elif key.startswith(DELETE_PRIMITIVE):
            field = key[len(DELETE_PRIMITIVE) :]
            if not isinstance(value, list):
                raise BadPatch(f"{key} must be a list")
            result[field] = [item for item in result.get(field, []) if item not in value]
        elif value is None:
            result.pop(key, None)
        elif isinstance(value, dict):
            current = result.get(key)
            merged = _merge_map(current if isinstance(current, dict) else {}, value)
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
        elif isinstance(value, list):
            current = result.get(key)
            result[key] = _merge_list(key, current if isinstance(current, list) else [], value)
        else:
            result[key] = copy.deepcopy(value)
    for field, order in orders.items():
        if isinstance(result.get(field), list):
            result[field] = _ordered(field, result[field], order)
    return result


def _merge_list(field: str, original: list[Any], patch: list[Any]) -> list[Any]:
    if field not in MERGE_KEYS:
        return _replace_list(patch)
    key = MERGE_KEYS[field]
    if key is None:  # a primitive list that merges: the union, the server's order first
        return [*original, *(item for item in patch if item not in original)]
    if any(isinstance(item, dict) and item.get(DIRECTIVE) == "replace" for item in patch):
        return [item for item in _replace_list(patch) if item.get(DIRECTIVE) != "replace"]
    result = copy.deepcopy(original)
    for item in patch:
        if not isinstance(item, dict) or key not in item:
            raise BadPatch(f"{field}: an item does not contain its merge key {key!r}")
        at = next(
            (
                i
                for i, old in enumerate(result)
                if isinstance(old, dict) and old.get(key) == item[key]
            ),
            None,
        )
        if item.get(DIRECTIVE) == "delete":
            if at is not None:
                del result[at]
            continue
        if at is None:
            merged = _merge_map({}, item)
            if merged is not None:
                result.append(merged)
        else:
            merged = _merge_map(result[at], item)
            if merged is None:
                del result[at]
            else:
                result[at] = merged
    return result


def _replace_list(patch: list[Any]) -> list[Any]:
    return copy.deepcopy(patch)


def _ordered(field: str, items: list[Any], order: list[Any]) -> list[Any]:
    key = MERGE_KEYS.get(field)
    if key is None:
        ranked = {value: i for i, value in enumerate(order)}
        return sorted(items, key=lambda item: ranked.get(item, len(order)))
    positions = {entry.get(key): i for i, entry in enumerate(order) if isinstance(entry, dict)}
    return sorted(items, key=lambda item: positions.get(item.get(key), len(order)))
