"""``nimbus edge --emit haproxy``: the edge's routing as an HAProxy
configuration, for operators who already run HAProxy in front.

What maps onto HAProxy and how:

- an app is a backend, chosen by the request's Host (``<app>.`` prefix) and
  then by its routes' paths; every gateway of each of its regions is a
  server, health-checked on ``/_nimbus/health`` as fast as the edge probes
  (``inter`` = probe interval, ``fall``, ``rise`` = rise time / interval:
  the same hysteresis);
- ``failover``: the first region's gateways are the servers, the others
  are ``backup`` servers, in order (HAProxy sends to the first backup that
  is up, so the order holds for any number of regions);
- ``weighted``: every server active with a weight, the region's weight
  split over its gateways;
- ``latency``: HAProxy measures no latency; every server active with
  ``balance leastconn`` (a slower region holds more connections, so it
  gets fewer new ones). The nearest equivalent, not the same.
- retries: a failed connection is retried for every method (nothing was
  sent); a response timeout, an empty response, 502 and 503 only for
  idempotent methods or requests with an ``Idempotency-Key``
  (``http-request disable-l7-retry`` for the rest), on another server
  (``option redispatch 1``).

Pure: `render` takes the cluster and the apps and returns the text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from nimbus.dns.apps import AppInfo
from nimbus.edge.health import HealthConfig
from nimbus.edge.prober import PROBE_PATH, split_url
from nimbus.errors import NimbusError
from nimbus.multiregion.clusterfile import ClusterFile

IDEMPOTENT = ("GET", "HEAD", "OPTIONS", "PUT", "DELETE")
MAX_WEIGHT = 256                      # HAProxy's server weights are 0..256
_PARAM = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*(\+?)\}")


@dataclass(frozen=True)
class EmitOptions:
    host: str = "0.0.0.0"
    port: int = 8080
    health: HealthConfig = HealthConfig()
    retries: int = 3
    timeout_connect_s: float = 1.0
    timeout_server_s: float = 60.0     # a function may take long: the longest answer
    timeout_client_s: float = 30.0


def render(cluster: ClusterFile, apps: Iterable[AppInfo], options: EmitOptions,
           source: str = "") -> str:
    apps = sorted(apps, key=lambda a: a.name)
    h = options.health
    rise = max(1, round(h.rise_s / h.interval_s))
    out = [
        f"# HAProxy configuration written by `nimbus edge --emit haproxy`{source}.",
        "# Apps and their routes are those the regions served when it was written:",
        "# write it again after a deploy that changes an app's routes or regions.",
        "global",
        "    maxconn 4096",
        "",
        "defaults",
        "    mode http",
        "    option forwardfor",
        f"    timeout connect {_ms(options.timeout_connect_s)}",
        f"    timeout client {_ms(options.timeout_client_s)}",
        f"    timeout server {_ms(options.timeout_server_s)}",
        "    timeout http-request 10s",
        "    timeout http-keep-alive 5s",
        f"    timeout check {_ms(h.timeout_s)}",
        f"    retries {options.retries}",
        "    option redispatch 1",
        "    retry-on conn-failure empty-response response-timeout 502 503",
        "",
        "frontend nimbus",
        f"    bind {_bind(options.host)}:{options.port}",
        f"    monitor-uri {PROBE_PATH}",
        f"    acl idempotent method {' '.join(IDEMPOTENT)}",
        "    acl has_idempotency_key req.hdr(idempotency-key) -m found",
        "    # Only a failed connection is retried for the rest (nothing was sent).",
        "    http-request disable-l7-retry unless idempotent || has_idempotency_key",
    ]
    for app in apps:
        out.append(f"    acl host_{app.name} hdr_beg(host) -i {app.name}.")
    for app in apps:
        out.append(f"    use_backend app_{app.name} if host_{app.name}")
    for app in apps:
        patterns = sorted({path_regex(path) for _method, path in app.routes})
        if patterns:
            out.append(f"    acl path_{app.name} path_reg " + " ".join(patterns))
            out.append(f"    use_backend app_{app.name} if path_{app.name}")
    for app in apps:
        out += ["", *_backend(cluster, app, h, rise)]
    return "\n".join(out) + "\n"


def _backend(cluster: ClusterFile, app: AppInfo, h: HealthConfig, rise: int) -> list[str]:
    spec = app.regions
    policy = spec.policy if spec is not None else "failover"
    names = spec.names if spec is not None and spec.names is not None else (
        tuple(spec.weights) if spec is not None and policy == "weighted" else cluster.names)
    names = tuple(n for n in names if n in cluster.regions)
    lines = [f"backend app_{app.name}",
             f"    # regions {', '.join(names) or '(none in the cluster file)'}; "
             f"policy {policy}"]
    if policy == "latency":
        lines.append("    # HAProxy measures no latency: the least busy server is the "
                     "nearest equivalent")
        lines.append("    balance leastconn")
    else:
        lines.append("    balance roundrobin")
    lines += [
        f"    option httpchk GET {PROBE_PATH}",
        "    http-check expect status 200",
        f"    default-server check inter {_ms(h.interval_s)} fastinter {_ms(h.interval_s)} "
        f"downinter {_ms(h.interval_s)} fall {h.fall} rise {rise} "
        "observe layer4 error-limit 1 on-error mark-down",
        "    http-response set-header X-Nimbus-Region %[srv_name,field(1,.)]",
    ]
    weights = _weights(cluster, names, spec.weights if spec is not None else {})
    for i, region in enumerate(names):
        for j, url in enumerate(cluster.regions[region].gateways, start=1):
            host, port = split_url(url)
            address = f"[{host}]" if ":" in host else host
            server = f"    server {region}.{j} {address}:{port}"
            if policy == "failover" and i > 0:
                server += " backup"
            elif policy == "weighted":
                server += f" weight {weights[region]}"
            lines.append(server)
    return lines


def _weights(cluster: ClusterFile, names: tuple[str, ...], weights: dict[str, int],
             ) -> dict[str, int]:
    """Per-server weights so that each region's servers together weigh its
    share (HAProxy weights are integers up to 256)."""
    per_server = {n: weights.get(n, 0) / max(1, len(cluster.regions[n].gateways))
                  for n in names}
    top = max(per_server.values(), default=0.0)
    if top <= 0:
        return {n: 1 for n in names}
    scale = MAX_WEIGHT / top
    return {n: (max(1, round(w * scale)) if w > 0 else 0) for n, w in per_server.items()}


def path_regex(path: str) -> str:
    """A route path as an anchored regular expression, quoted for HAProxy
    (single quotes: no escapes processed inside): ``/users/{id}`` ->
    ``'^/users/[^/]+$'``, a greedy ``{proxy+}`` -> ``.+``."""
    parts: list[str] = []
    last = 0
    for m in _PARAM.finditer(path):
        parts.append(re.escape(path[last:m.start()]))
        parts.append(".+" if m.group(1) else "[^/]+")
        last = m.end()
    parts.append(re.escape(path[last:]))
    body = "".join(parts).replace("'", r"\x27")
    return f"'^{body}$'"


def _ms(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


def _bind(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def emit_haproxy(cluster: ClusterFile, options: EmitOptions) -> str:
    """Ask the regions for their apps and render the configuration. Fails
    (NimbusError) when no region answers; a region that does not answer is
    still in every backend (it may come back), and named in a comment."""
    from nimbus.dns.apps import collect_apps

    directory = collect_apps(cluster)
    if len(directory.errors) == len(cluster.regions):
        detail = "; ".join(f"{r}: {e}" for r, e in directory.errors.items())
        raise NimbusError(f"no region answered GET /v1/apps ({detail})")
    text = render(cluster, directory.apps.values(), options, f" from {cluster.path.name}")
    if directory.errors:
        missing = ", ".join(sorted(directory.errors))
        text = f"# Regions that did not answer when this was written: {missing}\n" + text
    return text
