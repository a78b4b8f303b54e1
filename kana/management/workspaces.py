"""How management commands name a workspace: by id or by name, whichever the admin has."""

from django.core.management.base import CommandError

from kana.models import Workspace

WORKSPACE_HELP = "workspace id or exact name (`make run` prints the demo's; create_workspace prints a new one's)"


def workspace_from_argument(value: str) -> Workspace:
    """The workspace whose id is ``value``, else the one named exactly ``value``.

    An id wins over a name that looks like one. Names are not unique: two workspaces with
    the same name are refused with their ids, rather than guessing which one was meant.
    """
    if value.isdigit():
        found = Workspace.objects.filter(pk=int(value)).first()
        if found is not None:
            return found
    named = list(Workspace.objects.filter(name=value).order_by("pk")[:5])
    if len(named) == 1:
        return named[0]
    if named:
        ids = ", ".join(str(workspace.pk) for workspace in named)
        raise CommandError(f"several workspaces are named {value!r} (ids {ids}): give the id")
    raise CommandError(f"no workspace with id or name {value!r}")
