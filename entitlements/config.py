"""Config as code (SPEC §11): a workspace's features and packages as YAML (Kana's
``kana.yaml``), and the difference a file makes, shown and applied.

The file is the customer's source of truth for what it names; what it leaves out is left
alone (a feature or package missing from the file is not deleted, a field missing from an
entry is not changed). Applying goes through the same services as the API (audit rows
included), all in one transaction: a file applies whole or not at all. What a published
package may not change (its kind and features: SPEC §11) is refused before anything is
written, with every refusal listed.
"""

from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

import yaml
from django.db import transaction

from features.models import Feature, FeatureType
from features.services import feature_create, feature_update
from kana.errors import DomainError
from kana.models import Workspace

from .models import Package, PackageStatus, ResetPeriod
from .services import PackageFeatureSpec, package_create, package_summary, package_update

FEATURE_FIELDS = ("name", "type", "unit_label", "unit_label_plural", "metadata", "archived")
PACKAGE_FIELDS = ("name", "is_addon", "status", "metadata", "features")
OFFER_FIELDS = ("feature", "limit", "overage_enabled", "reset_period")
# What a package that is no longer a draft may still change (entitlements.services agrees).
CHANGEABLE_WHEN_PUBLISHED = {"name", "metadata", "status"}
NEXT_STATUSES = {
    PackageStatus.DRAFT: {PackageStatus.PUBLISHED, PackageStatus.ARCHIVED},
    PackageStatus.PUBLISHED: {PackageStatus.ARCHIVED},
    PackageStatus.ARCHIVED: set(),
}


class ConfigError(DomainError):
    """A config file that is not valid: ``field`` is the path of the fault (``packages[1].features[0].limit``)."""


# --- Export ----------------------------------------------------------------------------------


def _number(value: Decimal | None) -> int | float | None:
    if value is None:
        return None
    return int(value) if value == value.to_integral_value() else float(value)


def _feature_entry(feature: Feature) -> dict:
    return {
        "id": feature.key,
        "name": feature.name,
        "type": feature.type,
        "unit_label": feature.unit_label,
        "unit_label_plural": feature.unit_label_plural,
        "metadata": feature.metadata or {},
        "archived": feature.archived_at is not None,
    }


def _package_entry(package: Package) -> dict:
    """The package as the audit log summarises it, with its id, and limits as YAML numbers."""
    summary = package_summary(package)
    offers = [
        {**offer, "limit": _number(None if offer["limit"] is None else Decimal(offer["limit"]))}
        for offer in summary.pop("features")
    ]
    return {"id": package.key, **summary, "features": offers}


def config_export(*, workspace: Workspace) -> dict:
    """The workspace's features and packages, in the file's shape (ordered by id)."""
    features = Feature.objects.for_workspace(workspace).order_by("key")
    packages = Package.objects.for_workspace(workspace).order_by("key")
    return {
        "workspace": workspace.name,
        "features": [_feature_entry(feature) for feature in features],
        "packages": [_package_entry(package) for package in packages],
    }


def config_yaml(config: dict) -> str:
    header = "# Kana configuration: features and packages (manage.py kana_config apply FILE [--dry-run]).\n"
    return header + yaml.safe_dump(config, sort_keys=False, allow_unicode=True, default_flow_style=False)


# --- Reading a file --------------------------------------------------------------------------


def _fail(path: str, message: str):
    raise ConfigError("invalid_config", f"{path}: {message}", path)


def _mapping(value: Any, path: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> dict:
    if not isinstance(value, dict):
        _fail(path, "must be a mapping")
    unknown = sorted(set(value) - set(allowed), key=str)
    if unknown:
        _fail(f"{path}.{unknown[0]}" if path else str(unknown[0]), f"unknown field; known: {', '.join(allowed)}")
    for name in required:
        if name not in value:
            _fail(f"{path}.{name}" if path else name, "is required")
    return value


def _typed(entry: dict, name: str, path: str, kinds: tuple[type, ...], what: str) -> None:
    if name in entry and (not isinstance(entry[name], kinds) or isinstance(entry[name], bool) != (bool in kinds)):
        _fail(f"{path}.{name}", f"must be {what}")


def _limit(value: Any, path: str) -> Decimal | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        _fail(path, "must be a number or null (unlimited)")
    try:
        limit = Decimal(str(value))
    except InvalidOperation:
        _fail(path, "must be a number or null (unlimited)")
    if not limit.is_finite() or limit < 0:
        _fail(path, "must be 0 or more, or null (unlimited)")
    return limit


def _list(config: dict, name: str) -> list:
    value = config.get(name) or []
    if not isinstance(value, list):
        _fail(name, "must be a list")
    return value


def _ids(entries: list, path: str) -> None:
    seen = set()
    for index, entry in enumerate(entries):
        if entry["id"] in seen:
            _fail(f"{path}[{index}].id", f"{entry['id']!r} is named twice")
        seen.add(entry["id"])


def config_parse(text: str) -> dict:
    """A file's text, checked and normalised: ``{"workspace"?, "features": [...], "packages": [...]}``
    with only the fields the file gives. A fault is a ConfigError naming where it is."""
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError("invalid_config", f"not valid YAML: {error}") from None
    config = _mapping(config if config is not None else {}, "", ("workspace", "features", "packages"))
    features = []
    for index, entry in enumerate(_list(config, "features")):
        path = f"features[{index}]"
        entry = _mapping(entry, path, ("id", *FEATURE_FIELDS), ("id",))
        for name in ("id", "name", "unit_label", "unit_label_plural"):
            _typed(entry, name, path, (str,), "text")
        _typed(entry, "metadata", path, (dict,), "a mapping")
        _typed(entry, "archived", path, (bool,), "true or false")
        if "type" in entry and entry["type"] not in FeatureType.values:
            _fail(f"{path}.type", f"must be one of {', '.join(FeatureType.values)}")
        features.append(dict(entry))
    packages = []
    for index, entry in enumerate(_list(config, "packages")):
        path = f"packages[{index}]"
        entry = dict(_mapping(entry, path, ("id", *PACKAGE_FIELDS), ("id",)))
        for name in ("id", "name"):
            _typed(entry, name, path, (str,), "text")
        _typed(entry, "metadata", path, (dict,), "a mapping")
        _typed(entry, "is_addon", path, (bool,), "true or false")
        if "status" in entry and entry["status"] not in PackageStatus.values:
            _fail(f"{path}.status", f"must be one of {', '.join(PackageStatus.values)}")
        if "features" in entry:
            if not isinstance(entry["features"], list):
                _fail(f"{path}.features", "must be a list")
            offers = []
            for n, offer in enumerate(entry["features"]):
                where = f"{path}.features[{n}]"
                offer = _mapping(offer, where, OFFER_FIELDS, ("feature",))
                _typed(offer, "feature", where, (str,), "a feature id")
                _typed(offer, "overage_enabled", where, (bool,), "true or false")
                if offer.get("reset_period", ResetPeriod.MONTH) not in ResetPeriod.values:
                    _fail(f"{where}.reset_period", f"must be one of {', '.join(ResetPeriod.values)}")
                offers.append(
                    {
                        "feature": offer["feature"],
                        "limit": _limit(offer.get("limit"), f"{where}.limit"),
                        "overage_enabled": offer.get("overage_enabled", False),
                        "reset_period": offer.get("reset_period", ResetPeriod.MONTH),
                    }
                )
            entry["features"] = sorted(offers, key=lambda offer: offer["feature"])
        packages.append(entry)
    _ids(features, "features")
    _ids(packages, "packages")
    workspace = config.get("workspace")
    if workspace is not None and not isinstance(workspace, str | int):
        _fail("workspace", "must be a workspace's name or id")
    return {"workspace": workspace, "features": features, "packages": packages}


# --- The difference --------------------------------------------------------------------------


@dataclass
class Change:
    kind: str  # "feature" or "package"
    key: str
    create: bool
    fields: dict  # the new values (all given fields for a creation)
    before: dict = field(default_factory=dict)

    def describe(self) -> str:
        if self.create:
            shown = ", ".join(f"{name} {_shown(name, value)}" for name, value in self.fields.items() if name != "id")
            return f"+ {self.kind} {self.key}" + (f": {shown}" if shown else "")
        shown = "; ".join(
            f"{name} {_shown(name, self.before.get(name))} -> {_shown(name, value)}"
            for name, value in self.fields.items()
        )
        return f"~ {self.kind} {self.key}: {shown}"


def _shown(name: str, value: Any) -> str:
    if name == "features":
        offers = [
            f"{o['feature']}={'unlimited' if o['limit'] is None else _number(o['limit'])}/{o['reset_period']}"
            + ("+overage" if o["overage_enabled"] else "")
            for o in value or []
        ]
        return "[" + ", ".join(offers) + "]"
    return repr(value)


@dataclass
class Plan:
    changes: list[Change]
    refusals: list[str]
    unchanged: int

    @property
    def lines(self) -> list[str]:
        lines = [change.describe() for change in self.changes] + [f"! {refusal}" for refusal in self.refusals]
        return lines + [f"= {self.unchanged} unchanged"]


def _current_offers(package: Package) -> list[dict]:
    return [
        {
            "feature": o.feature.key,
            "limit": o.limit,
            "overage_enabled": o.overage_enabled,
            "reset_period": o.reset_period,
        }
        for o in sorted(package.features.all(), key=lambda o: o.feature.key)
    ]


def _same(name: str, current: Any, wanted: Any) -> bool:
    if name == "features":  # limits compare as numbers: 500 == 500.000000000
        return [{**o, "limit": None if o["limit"] is None else Decimal(o["limit"])} for o in current] == wanted
    return current == wanted


def config_plan(*, workspace: Workspace, config: dict) -> Plan:
    """What applying ``config`` (from ``config_parse``) to the workspace would change, and what it
    refuses: a published or archived package's kind or features, a status going back."""
    changes, refusals, unchanged = [], [], 0
    features = {f.key: f for f in Feature.objects.for_workspace(workspace)}
    for entry in config["features"]:
        feature = features.get(entry["id"])
        if feature is None:
            changes.append(Change("feature", entry["id"], True, {k: v for k, v in entry.items() if k != "id"}))
            continue
        current = _feature_entry(feature)
        differ = {name: value for name, value in entry.items() if name != "id" and current[name] != value}
        if differ:
            changes.append(Change("feature", feature.key, False, differ, {n: current[n] for n in differ}))
        else:
            unchanged += 1
    packages = {p.key: p for p in Package.objects.for_workspace(workspace).prefetch_related("features__feature")}
    for entry in config["packages"]:
        package = packages.get(entry["id"])
        if package is None:
            if entry.get("status") == PackageStatus.ARCHIVED:
                refusals.append(f"package {entry['id']}: a new package is draft or published, not archived")
            else:
                changes.append(Change("package", entry["id"], True, {k: v for k, v in entry.items() if k != "id"}))
            continue
        current = {**_package_entry(package), "features": _current_offers(package)}
        differ = {n: v for n, v in entry.items() if n != "id" and not _same(n, current[n], v)}
        if not differ:
            unchanged += 1
            continue
        locked = sorted(set(differ) - CHANGEABLE_WHEN_PUBLISHED) if package.status != PackageStatus.DRAFT else []
        if locked:
            wanted = "; ".join(f"{n} {_shown(n, current[n])} -> {_shown(n, differ[n])}" for n in locked)
            refusals.append(
                f"package {package.key} is {package.status}: its {', '.join(locked)} cannot change ({wanted});"
                " create a new package instead"
            )
        elif "status" in differ and differ["status"] not in NEXT_STATUSES[package.status]:
            refusals.append(f"package {package.key} is {package.status}: it cannot become {differ['status']}")
        else:
            changes.append(Change("package", package.key, False, differ, {n: current[n] for n in differ}))
    return Plan(changes=changes, refusals=refusals, unchanged=unchanged)


def _offers(values: list[dict]) -> list[PackageFeatureSpec]:
    return [
        PackageFeatureSpec(
            feature_key=o["feature"],
            limit=o["limit"],
            overage_enabled=o["overage_enabled"],
            reset_period=o["reset_period"],
        )
        for o in values
    ]


def config_apply(*, workspace: Workspace, plan: Plan, actor: str = "cli") -> int:
    """Make the plan's changes, features first (packages name them), in one transaction through
    the services; returns how many. A plan with refusals is not applied at all."""
    if plan.refusals:
        raise ConfigError("config_refused", f"{len(plan.refusals)} change(s) refused: nothing applied")
    with transaction.atomic():
        for change in sorted(plan.changes, key=lambda change: change.kind != "feature"):
            fields = dict(change.fields)
            if change.kind == "feature":
                archived = fields.pop("archived", None)
                if change.create:
                    feature = feature_create(workspace=workspace, key=change.key, actor=actor, **fields)
                    if archived:
                        feature_update(workspace=workspace, feature=feature, archived=True, actor=actor)
                else:
                    feature = Feature.objects.for_workspace(workspace).get(key=change.key)
                    feature_update(workspace=workspace, feature=feature, archived=archived, actor=actor, **fields)
            elif change.create:
                if "features" in fields:
                    fields["features"] = _offers(fields["features"])
                package_create(workspace=workspace, key=change.key, actor=actor, **fields)
            else:
                if "features" in fields:
                    fields["features"] = _offers(fields["features"])
                package = Package.objects.for_workspace(workspace).get(key=change.key)
                package_update(workspace=workspace, package=package, changes=fields, actor=actor)
    return len(plan.changes)
