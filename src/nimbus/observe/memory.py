"""Process memory as Linux accounts it: RSS, PSS and private bytes."""

from __future__ import annotations


def memory_of(pid: int) -> dict[str, int] | None:
    """``{"rss_kb", "pss_kb", "private_kb"}`` from /proc/PID/smaps_rollup,
    or None if the process is gone or unreadable."""
    fields = {"Rss": 0, "Pss": 0, "Private_Clean": 0, "Private_Dirty": 0}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in fields:
                    fields[name] = int(rest.split()[0])
    except (OSError, ValueError):
        return None
    return {
        "rss_kb": fields["Rss"],
        "pss_kb": fields["Pss"],
        "private_kb": fields["Private_Clean"] + fields["Private_Dirty"],
    }
