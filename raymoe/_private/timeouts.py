"""Every wait and retry bound of the served pool, named and explained in one place.

Calls the controller makes to its actors (seconds):
"""

STATUS_S = 5.0  # a status/describe/stats/take_load call slower than this: "not answering"
EXPORT_S = 120.0  # a shard exporting a few MB of expert rows (a copy's source)
SOURCE_S = 60.0  # for some replica of an expert to be copied to answer (shards restart)
PLACE_S = 300.0  # a shard growing its bank and importing a few MB of rows
FREE_S = 30.0  # a shard forgetting old places
GATE_READ_S = 30.0  # a router handing back its gate weights
CHECKPOINT_S = 600.0  # a shard writing its rows into a checkpoint
CONFIGURE_S = 600.0  # a shard (re)loading every row it holds (a restarted shard of 1M experts)
DRAIN_GRACE_S = 5.0  # beyond control.drain_timeout_s, for the router's answer to arrive

# The gateways the controller keeps:
FLEET_CHECK_S = 5.0  # how often it looks for nodes that joined or left (per_node gateways)
GATEWAY_START_S = 60.0  # for a gateway to come up and report its endpoint

# The gateway:
HEALTH_INTERVAL_S = 2.0  # between readiness checks while the pool serves
HEALTH_RETRY_S = 0.2  # between readiness checks while it does not
HEALTH_FIRST_S = 30.0  # the first check (it attaches to the pool's actors)

# A router's retries of a failed sub-batch (bounded further by the request's deadline):
MAX_ATTEMPTS = 64
BACKOFF_S = (0.005, 0.5)  # the first and the largest wait between attempts

# A client (PoolHandle, gateway) hedges a forward to another router when its router has
# not answered within this, or 4x a typical call of its size (data/attempts.Picker); the
# silent router then gets no requests for SUSPECT_S
ROUTER_HEDGE_S = 0.25
SUSPECT_S = 2.0

# A PoolHandle resends a forward whose router died for good (to a router it fetches again
# from the controller), for at most the call's timeout_s or this:
RESEND_S = 30.0

# The control loop:
UPDATE_INTERVAL_S = 0.25  # between reconcile passes
STANDBY_INTERVAL_S = 0.1  # between looks for dead shards a spare should stand in for
LOAD_INTERVAL_S = 1.0  # between control steps (load collection, bias, autoscale, rebalance)
