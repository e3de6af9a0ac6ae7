"""mitmdump entry point: `mitmdump -s addons/aibridge.py`. Builds the addon chain; nothing else.

Order matters: `Runtime` loads the config every other addon reads; `Drain` refuses new requests while the gateway
stops; `ProxyMode` and `ControlPlane` answer what is not a provider call before the `Pipeline` sees it;
`Observation` and `Capture` read what the pipeline decided.
"""

from aibridge_gw.addons.capture import Capture
from aibridge_gw.addons.control_plane import ControlPlane
from aibridge_gw.addons.drain import Drain
from aibridge_gw.addons.housekeeping import Housekeeping
from aibridge_gw.addons.idle import IdleConnections
from aibridge_gw.addons.observation import Observation
from aibridge_gw.addons.pipeline import Pipeline
from aibridge_gw.addons.proxy_mode import ProxyMode
from aibridge_gw.addons.runtime import Runtime

runtime = Runtime()
proxy_mode = ProxyMode(runtime)
housekeeping = Housekeeping(runtime)

addons = [
    runtime,  # config, store, shared services
    proxy_mode,  # tunnels, proxy credentials, egress policy
    Drain(runtime, proxy_mode),  # SIGTERM: stop listening, let calls in flight finish, then stop
    IdleConnections(runtime),  # request head timeout, idle connections per client address
    ControlPlane(runtime, proxy_mode, housekeeping),  # /aibridge/*: health, dashboard, metrics, admin API
    Pipeline(runtime, proxy_mode),  # route → identify → admit → inject → upstream; tap → record
    Observation(runtime),  # metrics and interception logs
    Capture(runtime),  # forensic flow capture
    housekeeping,  # retention, upstream timeouts, stall counters
]
