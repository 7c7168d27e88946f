"""`--dist loadgroup` honouring `xdist_group` marks under pytest 9: `name_groups`, called by conftest.py.

pytest-xdist (3.8) sends a group to one worker by appending `@group` to each marked test's node id, which it
does by setting `item._nodeid`. pytest 9 keeps the id in `item._id` and no longer reads `_nodeid`, so every
group was silently ignored. `tests/test_xdist_groups.py` checks that a group stays on one worker.
"""

from __future__ import annotations


def name_groups(config, items) -> None:
    """On a worker of a --dist loadgroup run, append `@group` to the node id of each test marked with
    xdist_group (the marks' names sorted and joined by "_", as pytest-xdist names them) where it is missing."""
    if not getattr(config.option, "loadgroup", False):  # set on each worker of a --dist loadgroup run
        return
    from _pytest.nodeid import NodeId

    for item in items:
        names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                        for m in item.iter_markers("xdist_group")})
        if names and "@" not in item.nodeid.rpartition("]")[2]:
            item._id = NodeId.parse(f"{item.nodeid}@{'_'.join(names)}")
