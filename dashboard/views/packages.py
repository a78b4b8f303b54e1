"""Packages (SPEC §11): list, create a draft with its feature rows, edit a draft, publish,
archive; a published package changes only its name and metadata. Every change goes through
``entitlements.services`` (which writes the audit row); a refusal is shown in the form."""

import json
import re

from django.contrib import messages
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_http_methods, require_POST

from entitlements.models import Package, PackageStatus
from entitlements.services import EntitlementError, package_create, package_update
from features.models import FeatureType

from ..access import actor_of, workspace_view
from ..forms import PackageForm, PublishedPackageForm, package_feature_formset
from ..templatetags.kana_dashboard import service_message

_FEATURE_ROW = re.compile(r"^features\[(\d+)\]")


def _packages():
    return Package.objects.prefetch_related("features__feature")


def _package_or_404(request, pk: int) -> Package:
    return get_object_or_404(_packages().for_workspace(request.workspace), pk=pk)


def _feature_rows(package: Package) -> list[dict]:
    return [
        {
            "feature": pf.feature.key,
            "binary": pf.feature.type == FeatureType.BINARY,
            "limit": None if pf.limit is None else pf.limit.normalize(),
            "overage_enabled": pf.overage_enabled,
            "reset_period": pf.reset_period,
        }
        for pf in sorted(package.features.all(), key=lambda pf: pf.feature.key)
    ]


def _place_error(form, formset, exc: EntitlementError, *, spec_rows: list[int]) -> None:
    """A service refusal next to what caused it: the feature row (``features[2].limit`` names
    the third non-blank row, ``spec_rows`` maps it back to the form's row), else the field."""
    message = service_message(exc)
    match = _FEATURE_ROW.match(exc.field or "")
    if match and int(match.group(1)) < len(spec_rows):
        formset.forms[spec_rows[int(match.group(1))]].add_error(None, message)
    elif exc.field == "id" and "key" in form.fields:
        form.add_error("key", message)
    elif exc.field in form.fields:
        form.add_error(exc.field, message)
    else:
        form.add_error(None, message)


def _specs(formset) -> tuple[list, list[int]]:
    """The non-blank rows as the service takes them, and each one's index in the form."""
    specs, rows = [], []
    for index, row in enumerate(formset.forms):
        spec = row.spec()
        if spec is not None:
            specs.append(spec)
            rows.append(index)
    return specs, rows


def _list_page(request, form, formset, status_code=200):
    packages = list(_packages().for_workspace(request.workspace).order_by("status", "key"))
    for package in packages:
        package.rows = _feature_rows(package)
    context = {"packages": packages, "form": form, "formset": formset}
    return render(request, "dashboard/packages.html", context, status=status_code)


@require_http_methods(["GET", "POST"])
@workspace_view
def packages(request):
    workspace = request.workspace
    if request.method == "GET":
        return _list_page(request, PackageForm(), package_feature_formset(workspace))
    form, formset = PackageForm(request.POST), package_feature_formset(workspace, request.POST)
    if form.is_valid() and formset.is_valid():
        specs, spec_rows = _specs(formset)
        try:
            package = package_create(
                workspace=workspace,
                key=form.cleaned_data["key"],
                name=form.cleaned_data["name"],
                is_addon=form.cleaned_data["is_addon"],
                metadata=form.cleaned_data["metadata"],
                features=specs,
                actor=actor_of(request),
            )
        except EntitlementError as exc:
            _place_error(form, formset, exc, spec_rows=spec_rows)
        else:
            messages.success(request, f"Draft package {package.key} created. Publish it to take subscriptions.")
            return redirect("dashboard:package", package.pk)
    return _list_page(request, form, formset, status_code=400)


def _edit_page(request, package, form, formset=None, status_code=200):
    context = {
        "package": package,
        "rows": _feature_rows(package),
        "form": form,
        "formset": formset,
        "subscription_count": package.subscriptions.count(),
    }
    return render(request, "dashboard/package.html", context, status=status_code)


def _metadata_text(package: Package) -> str:
    return json.dumps(package.metadata, indent=2, sort_keys=True) if package.metadata else ""


@require_http_methods(["GET", "POST"])
@workspace_view
def package_detail(request, pk: int):
    """A draft's whole form (fields and feature rows); a published or archived package's name
    and metadata only."""
    workspace = request.workspace
    package = _package_or_404(request, pk)
    is_draft = package.status == PackageStatus.DRAFT
    if request.method == "GET":
        initial = {"name": package.name, "metadata": _metadata_text(package)}
        if not is_draft:
            return _edit_page(request, package, PublishedPackageForm(initial=initial))
        form = PackageForm(initial={**initial, "key": package.key, "is_addon": "true" if package.is_addon else "false"})
        form.fields["key"].disabled = True
        return _edit_page(request, package, form, package_feature_formset(workspace, rows=_feature_rows(package)))

    if not is_draft and "features-TOTAL_FORMS" in request.POST:
        # A draft's form, posted after someone published (or archived) the package: its rows
        # would no longer be saved, so nothing is, and the admin is told why.
        form = PublishedPackageForm(request.POST)
        form.is_valid()
        form.add_error(
            None,
            f"Package {package.key} was {package.status} meanwhile: its features and kind no longer change,"
            " so nothing was saved. Its name and metadata still can.",
        )
        return _edit_page(request, package, form, status_code=409)
    formset = package_feature_formset(workspace, request.POST) if is_draft else None
    form = PackageForm(request.POST, initial={"key": package.key}) if is_draft else PublishedPackageForm(request.POST)
    if is_draft:
        form.fields["key"].disabled = True
    if form.is_valid() and (formset is None or formset.is_valid()):
        changes = {"name": form.cleaned_data["name"], "metadata": form.cleaned_data["metadata"]}
        spec_rows = []
        if is_draft:
            changes["is_addon"] = form.cleaned_data["is_addon"]
            changes["features"], spec_rows = _specs(formset)
        try:
            package = package_update(workspace=workspace, package=package, changes=changes, actor=actor_of(request))
        except EntitlementError as exc:
            _place_error(form, formset, exc, spec_rows=spec_rows)
        else:
            messages.success(request, f"Package {package.key} saved.")
            return redirect("dashboard:package", package.pk)
    return _edit_page(request, _package_or_404(request, pk), form, formset, status_code=400)


_STATUS_DONE = {PackageStatus.PUBLISHED: "published: it takes subscriptions", PackageStatus.ARCHIVED: "archived"}


@require_POST
@workspace_view
def package_status(request, pk: int):
    """The Publish and Archive buttons."""
    package = _package_or_404(request, pk)
    status = request.POST.get("status", "")
    if status not in _STATUS_DONE:
        messages.error(request, "Choose Publish or Archive.")
        return redirect("dashboard:package", package.pk)
    try:
        package = package_update(
            workspace=request.workspace, package=package, changes={"status": status}, actor=actor_of(request)
        )
    except EntitlementError as exc:
        messages.error(request, service_message(exc))
    else:
        messages.success(request, f"Package {package.key} {_STATUS_DONE[status]}.")
    return redirect("dashboard:package", package.pk)
