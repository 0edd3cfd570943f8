"""A pure-Python renderer for the subset of Kustomize that deploy/k8s uses.

The tests render the overlays with it when neither `kustomize` nor `kubectl kustomize` is
installed, and compare it with the real thing when one is (test_k8s.py). It refuses any
kustomization field it does not implement rather than ignore it, so a new feature in
deploy/k8s fails loudly here until the renderer learns it.

Implemented: resources (files and directories), namespace, labels (pairs, metadata only),
images (newName, newTag, digest) and patches given as JSON 6902 operations in a file, with
a target (group, version, kind, name, namespace).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

SUPPORTED_FIELDS = {"apiVersion", "kind", "namespace", "labels", "resources", "images",
                    "patches"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume",
                  "StorageClass", "CustomResourceDefinition", "PriorityClass",
                  "IngressClass", "RuntimeClass"}


class KustomizeError(ValueError):
    pass


def load_kustomization(directory: Path) -> dict[str, Any]:
    path = Path(directory) / "kustomization.yaml"
    if not path.is_file():
        raise KustomizeError(f"{directory}: no kustomization.yaml")
    kust = yaml.safe_load(path.read_text()) or {}
    if kust.get("kind", "Kustomization") != "Kustomization":
        raise KustomizeError(f"{path}: kind must be Kustomization")
    unknown = set(kust) - SUPPORTED_FIELDS
    if unknown:
        raise KustomizeError(f"{path}: fields this renderer does not implement: {unknown}")
    return kust


def referenced_files(directory: Path) -> list[Path]:
    """Every path a kustomization names (resources and patch files), resolved."""
    directory = Path(directory)
    kust = load_kustomization(directory)
    paths = [directory / r for r in kust.get("resources", [])]
    paths += [directory / p["path"] for p in kust.get("patches", []) if "path" in p]
    return paths


def render(directory: Path) -> list[dict[str, Any]]:
    directory = Path(directory)
    kust = load_kustomization(directory)
    objects: list[dict[str, Any]] = []
    for resource in kust.get("resources", []):
        path = directory / resource
        if path.is_dir():
            objects += render(path)
        elif path.is_file():
            objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
        else:
            raise KustomizeError(f"{directory}: resource {resource} does not exist")
    for patch in kust.get("patches", []):
        _apply_patch(directory, patch, objects)
    if "namespace" in kust:
        for obj in objects:
            if obj.get("kind") not in CLUSTER_SCOPED:
                obj.setdefault("metadata", {})["namespace"] = kust["namespace"]
    for label in kust.get("labels", []):
        if set(label) - {"pairs"}:
            raise KustomizeError(f"{directory}: labels support only `pairs`: {label}")
        for obj in objects:
            obj.setdefault("metadata", {}).setdefault("labels", {}).update(label["pairs"])
    for image in kust.get("images", []):
        for obj in objects:
            _set_image(obj, image)
    return objects


def _apply_patch(directory: Path, patch: dict[str, Any], objects: list[dict]) -> None:
    if set(patch) - {"path", "target"} or "path" not in patch or "target" not in patch:
        raise KustomizeError(f"{directory}: patches need exactly `path` and `target`")
    ops = yaml.safe_load((directory / patch["path"]).read_text())
    if not isinstance(ops, list):
        raise KustomizeError(f"{patch['path']}: only JSON 6902 patches (a list of ops)")
    matched = [obj for obj in objects if _matches(obj, patch["target"])]
    if not matched:
        raise KustomizeError(f"{patch['path']}: target {patch['target']} matches nothing")
    for obj in matched:
        for op in ops:
            apply_operation(obj, op)


def _matches(obj: dict[str, Any], target: dict[str, Any]) -> bool:
    group, _, version = obj.get("apiVersion", "").rpartition("/")
    meta = obj.get("metadata", {})
    wanted = {"group": group, "version": version, "kind": obj.get("kind"),
              "name": meta.get("name"), "namespace": meta.get("namespace")}
    unknown = set(target) - set(wanted)
    if unknown:
        raise KustomizeError(f"unsupported patch target fields {unknown}")
    return all(wanted[key] == value for key, value in target.items())


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise KustomizeError(f"JSON pointer must start with /: {path}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def apply_operation(doc: dict[str, Any], op: dict[str, Any]) -> None:
    """Apply one RFC 6902 operation (add, replace, remove, test) in place."""
    parts = _pointer(op["path"])
    parent: Any = doc
    for part in parts[:-1]:
        try:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        except (KeyError, IndexError, ValueError) as error:
            raise KustomizeError(f"{op['path']}: no {part!r}") from error
    last = parts[-1]
    kind = op.get("op")
    if isinstance(parent, list):
        index = len(parent) if last == "-" else int(last)
        if kind == "add":
            parent.insert(index, copy.deepcopy(op["value"]))
        elif kind == "replace":
            parent[index] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del parent[index]
        elif kind == "test":
            if parent[index] != op["value"]:
                raise KustomizeError(f"test failed at {op['path']}")
        else:
            raise KustomizeError(f"unsupported op {kind}")
        return
    if not isinstance(parent, dict):
        raise KustomizeError(f"{op['path']}: parent is not an object")
    if kind in ("replace", "remove", "test") and last not in parent:
        raise KustomizeError(f"{op['path']}: nothing to {kind}")
    if kind in ("add", "replace"):
        parent[last] = copy.deepcopy(op["value"])
    elif kind == "remove":
        del parent[last]
    elif kind == "test":
        if parent[last] != op["value"]:
            raise KustomizeError(f"test failed at {op['path']}")
    else:
        raise KustomizeError(f"unsupported op {kind}")


def _image_name(image: str) -> str:
    name = image.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    return name[:colon] if colon > slash else name


def _set_image(node: Any, rule: dict[str, Any]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for container in value:
                    image = container.get("image", "")
                    if _image_name(image) == rule["name"]:
                        name = rule.get("newName", rule["name"])
                        if "digest" in rule:
                            container["image"] = f"{name}@{rule['digest']}"
                        elif "newTag" in rule:
                            container["image"] = f"{name}:{rule['newTag']}"
                        else:
                            tail = image[len(_image_name(image)):]
                            container["image"] = name + tail
            else:
                _set_image(value, rule)
    elif isinstance(node, list):
        for item in node:
            _set_image(item, rule)
