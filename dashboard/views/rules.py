"""Features, the rule builder, rules with live reprocessing progress, the unmapped explorer."""

import re

from django.contrib import messages
from django.db import transaction
from django.http import JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils.http import urlencode
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from features.models import Feature, MappingRule, UnmappedReason
from features.preview import rule_preview as preview_rule
from features.selectors import reprocessing_by_rule, reprocessing_of, unmapped_by_event, unmapped_by_property
from features.services import FeatureError, RuleDefinition, feature_create, rule_create, rule_update

from ..access import actor_of, workspace_view
from ..forms import (
    MAX_CONDITIONS,
    NEW_FEATURE,
    ConditionFormSet,
    FeatureForm,
    RuleForm,
    format_value,
    in_dashboard_words,
)

# Rules are few per workspace; the list shows the newest this many.
RULES_SHOWN = 200
REASON_LABELS = {
    UnmappedReason.NO_MATCHING_RULE: "no rule matches",
    UnmappedReason.UNKNOWN_FEATURE: "names an unknown featureId",
    UnmappedReason.INVALID_DELTA: "amount is not a number",
    UnmappedReason.INVALID_AMOUNT: "amount is too large to record",
    UnmappedReason.INVALID_VALUE: "a value the rules cannot evaluate",
}
_CONDITION_FIELD = re.compile(r"^conditions\[(\d+)\]")


def _features_page(request, form, status_code=200):
    features = list(Feature.objects.for_workspace(request.workspace).order_by("key"))
    rule_counts = {}
    for feature_id in MappingRule.objects.for_workspace(request.workspace).values_list("feature_id", flat=True):
        rule_counts[feature_id] = rule_counts.get(feature_id, 0) + 1
    for feature in features:
        feature.rule_count = rule_counts.get(feature.pk, 0)
    return render(request, "dashboard/features.html", {"features": features, "form": form}, status=status_code)


@require_http_methods(["GET", "POST"])
@workspace_view
def features(request):
    if request.method == "GET":
        return _features_page(request, FeatureForm(initial={"key": request.GET.get("key", "")}))
    form = FeatureForm(request.POST)
    if form.is_valid():
        try:
            feature = feature_create(workspace=request.workspace, actor=actor_of(request), **form.cleaned_data)
        except FeatureError as exc:
            form.add_error("key" if exc.field == "id" else exc.field if exc.field in form.fields else None, exc.message)
        else:
            messages.success(request, f"Feature {feature.key} created; events that named it are being mapped.")
            return redirect("dashboard:features")
    return _features_page(request, form, status_code=400)


def _with_progress(rules: list[MappingRule]) -> list[MappingRule]:
    """Attach each rule's reprocessing progress, in one query for the whole list."""
    if not rules:
        return rules
    progress = reprocessing_by_rule(rules[0].workspace_id, [rule.pk for rule in rules])
    for rule in rules:
        rule.progress = progress[rule.pk]
    return rules


@require_GET
@workspace_view
def rules(request):
    rule_list = list(
        MappingRule.objects.for_workspace(request.workspace)
        .select_related("feature")
        .order_by("-created_at", "-pk")[:RULES_SHOWN]
    )
    return render(request, "dashboard/rules.html", {"rules": _with_progress(rule_list)})


def _prefill(request) -> tuple[dict, list[dict]]:
    """Builder values from a "create a rule from this" link."""
    event = request.GET.get("event", "")
    prop = request.GET.get("property", "")
    value = request.GET.get("value", "")
    name = request.GET.get("name") or " where ".join(filter(None, [event, f"{prop} = {value}" if prop else ""]))
    rule = {"name": name, "event_name": event, "feature": request.GET.get("feature", ""), "amount_property": ""}
    conditions = [{"property": prop, "operator": request.GET.get("operator", "equals"), "value": value}] if prop else []
    return rule, conditions


def _builder(request, form, formset, status_code=200):
    has_features = Feature.objects.for_workspace(request.workspace).exists()
    context = {"form": form, "formset": formset, "has_features": has_features, "max_conditions": MAX_CONDITIONS}
    return render(request, "dashboard/rule_new.html", context, status=status_code)


def _place_error(form, condition_forms: list, exc: FeatureError, *, new_feature: bool) -> None:
    """Show a service error next to what caused it (the condition row, or the field), in the
    builder's words."""
    message = in_dashboard_words(exc.message)
    match = _CONDITION_FIELD.match(exc.field or "")
    if match and int(match.group(1)) < len(condition_forms):
        condition_forms[int(match.group(1))].add_error(None, message)
    elif new_feature and exc.field in ("id", "type"):  # feature_create's fields
        form.add_error("new_feature_key" if exc.field == "id" else "new_feature_type", message)
    elif exc.field in form.fields:
        form.add_error(exc.field, message)
    else:
        form.add_error(None, message)


def _posted_rows(formset) -> list[dict]:
    return [
        {name: form.data.get(form.add_prefix(name), "") for name in ("property", "operator", "value")}
        for form in formset.forms
    ]


def _edit_rows(request):
    """Without JavaScript, "Add a condition" and "Remove" submit the form: the builder comes
    back with a row more or less, and nothing is saved."""
    rows = _posted_rows(ConditionFormSet(request.POST, prefix="conditions"))
    if "add_condition" in request.POST:
        rows = rows[: MAX_CONDITIONS - 1] + [{}]
    else:
        try:
            del rows[int(request.POST["remove_condition"])]
        except (ValueError, IndexError):
            pass
    form = RuleForm(workspace=request.workspace, initial=request.POST.dict())
    return _builder(request, form, ConditionFormSet(prefix="conditions", initial=rows))


@require_http_methods(["GET", "POST"])
@workspace_view
def rule_new(request):
    if request.method == "GET":
        initial, conditions = _prefill(request)
        keys = set(Feature.objects.for_workspace(request.workspace).values_list("key", flat=True))
        wanted = initial["feature"]
        if wanted and wanted not in keys:  # a featureId seen in events, not created yet
            initial.update(feature=NEW_FEATURE, new_feature_key=wanted)
        elif not keys:  # nothing to choose from: the rule creates its feature
            initial["feature"] = NEW_FEATURE
        rows = conditions or [{}]
        return _builder(
            request,
            RuleForm(workspace=request.workspace, initial=initial),
            ConditionFormSet(prefix="conditions", initial=rows),
        )
    if "add_condition" in request.POST or "remove_condition" in request.POST:
        return _edit_rows(request)
    form = RuleForm(request.POST, workspace=request.workspace)
    formset = ConditionFormSet(request.POST, prefix="conditions")
    if form.is_valid() and formset.is_valid():
        data = form.cleaned_data
        # Blank rows are skipped; the service numbers errors by the filled rows.
        filled = [(f, f.condition()) for f in formset.forms]
        filled = [(f, c) for f, c in filled if c is not None]
        new_feature = form.creates_feature
        definition = RuleDefinition(
            name=data["name"],
            feature_key=data["new_feature_key"].strip() if new_feature else data["feature"],
            event_name=data["event_name"].strip() or None,
            conditions=[c for _f, c in filled],
            amount_property=data["amount_property"] or None,
        )
        try:
            # The feature and its rule are created together or not at all.
            with transaction.atomic():
                if new_feature:
                    feature_create(
                        workspace=request.workspace,
                        key=definition.feature_key,
                        name=data["new_feature_name"].strip(),
                        type=data["new_feature_type"],
                        actor=actor_of(request),
                    )
                rule = rule_create(workspace=request.workspace, definition=definition, actor=actor_of(request))
        except FeatureError as exc:
            _place_error(form, [f for f, _c in filled], exc, new_feature=new_feature)
        else:
            created = f"Feature {definition.feature_key} and rule" if new_feature else "Rule"
            messages.success(request, f"{created} “{rule.name}” created; stored unmapped events are being reprocessed.")
            return redirect(f"{reverse('dashboard:rules')}#rule-{rule.pk}")
    return _builder(request, form, formset, status_code=400)


@require_POST
@workspace_view
def rule_preview(request):
    """What the builder's rule would map if saved now, as JSON for its Preview button.

    Takes the builder's form as posted; writes nothing. Errors answer 400 ``{"errors": [...]}``
    in the builder's words.
    """
    form = RuleForm(request.POST, workspace=request.workspace)
    formset = ConditionFormSet(request.POST, prefix="conditions")
    form.fields["name"].required = False  # a preview needs no name
    if not (form.is_valid() and formset.is_valid()):
        errors = [str(e) for field_errors in form.errors.values() for e in field_errors]
        errors += [str(e) for row in formset.errors for field_errors in row.values() for e in field_errors]
        return JsonResponse({"errors": errors or ["Check the rule's fields."]}, status=400)
    if form.creates_feature:
        message = "The preview needs an existing feature: save the rule to create it (its events are then mapped)."
        return JsonResponse({"errors": [message]}, status=400)
    data = form.cleaned_data
    definition = RuleDefinition(
        name=data["name"],
        feature_key=data["feature"],
        event_name=data["event_name"].strip() or None,
        conditions=[c for c in (f.condition() for f in formset.forms) if c is not None],
        amount_property=data["amount_property"] or None,
    )
    try:
        preview = preview_rule(workspace=request.workspace, definition=definition)
    except FeatureError as exc:
        return JsonResponse({"errors": [in_dashboard_words(exc.message)], "field": exc.field}, status=400)
    return JsonResponse(
        {
            "matched_events": preview.matched_events,
            "amount_total": f"{preview.amount_total.normalize():f}",
            "users_affected": preview.users_affected,
            "by_period": [
                {"start": p.start.date().isoformat(), "matched": p.matched, "amount": f"{p.amount.normalize():f}"}
                for p in preview.by_period
            ],
            "sample": preview.sample,
        }
    )


@require_GET
@workspace_view
def rule_progress(request, pk: int):
    rule = get_object_or_404(MappingRule.objects.for_workspace(request.workspace), pk=pk)
    progress = reprocessing_of(rule)
    body = {
        "id": rule.pk,
        "status": progress.status,
        "scanned": progress.scanned,
        "mapped": progress.mapped,
        "finished": progress.status in ("done", "failed"),
    }
    if progress.error:
        body["error"] = progress.error
    return JsonResponse(body)


@require_POST
@workspace_view
def rule_toggle(request, pk: int):
    rule = get_object_or_404(MappingRule.objects.for_workspace(request.workspace), pk=pk)
    rule = rule_update(workspace=request.workspace, rule=rule, active=not rule.active, actor=actor_of(request))
    messages.success(request, f"Rule “{rule.name}” {'activated' if rule.active else 'deactivated'}.")
    return redirect("dashboard:rules")


def _rule_link(**params) -> str:
    return f"{reverse('dashboard:rule_new')}?{urlencode({k: v for k, v in params.items() if v not in (None, '')})}"


@require_GET
@workspace_view
def unmapped(request):
    event = request.GET.get("event", "").strip() or None
    by_event = unmapped_by_event(request.workspace)
    for row in by_event:
        row["rule_url"] = _rule_link(event=row["event"])
        row["reason_label"] = REASON_LABELS.get(row["reason"], row["reason"])
    by_property = unmapped_by_property(request.workspace, event=event)
    for row in by_property["rows"]:
        text = format_value(row["value"])
        row["shown"] = text
        if row["property"] == "featureId":
            row["feature_url"] = f"{reverse('dashboard:features')}?{urlencode({'key': row['value']})}"
        row["rule_url"] = _rule_link(event=event, property=row["property"], value=text)
    context = {"event": event, "by_event": by_event, "by_property": by_property}
    return render(request, "dashboard/unmapped.html", context)
