"""The raymoe error vocabulary.

Every public failure is a subclass of :class:`RaymoeError`. Input errors are also
``ValueError``/``TypeError`` so that generic handlers keep working.
"""

from __future__ import annotations


class RaymoeError(Exception):
    """Base class of every error raymoe raises on purpose."""


# --- configuration -------------------------------------------------------------------------


class ConfigError(RaymoeError, ValueError):
    """A pool spec (YAML or dict) is malformed or describes an impossible pool.

    ``field`` is the dotted path of the offending field when one is known.
    """

    def __init__(self, message: str, field: str | None = None):
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


# --- input at the boundary -----------------------------------------------------------------


class InvalidInputError(RaymoeError, ValueError):
    """A request's tensors are not what the pool accepts. Nothing was changed."""


class ShapeError(InvalidInputError):
    """A tensor has the wrong rank or size."""


class DTypeError(InvalidInputError, TypeError):
    """A tensor has the wrong dtype."""


class NonFiniteError(InvalidInputError):
    """A tensor holds NaN or Inf and the spec forbids them."""


class LayoutError(InvalidInputError):
    """A tensor is non-contiguous or on the wrong device."""


class ExpertIdError(InvalidInputError):
    """An expert id is out of range or names an expert the pool does not have."""


class CheckpointError(InvalidInputError):
    """A checkpoint is missing, truncated, corrupted or does not fit the pool."""


class LayerIndexError(InvalidInputError, IndexError):
    """A layer index outside the pool's layers."""


class RequestTooLargeError(InvalidInputError):
    """A request is over the pool's size limits."""


class EmptyBatchError(InvalidInputError):
    """A request holds no tokens where the operation needs at least one."""


# --- serving -------------------------------------------------------------------------------


class PoolError(RaymoeError):
    """The pool could not serve a request (see the subclass and ``__cause__``)."""


class PoolNotFoundError(PoolError, LookupError):
    """No pool of that name runs in the cluster."""


class PoolUnavailableError(PoolError):
    """The pool (or the part of it a request needs) is not reachable right now."""


class StoreUnavailableError(PoolUnavailableError):
    """The metadata store (Redis) cannot be reached: serving goes on, but admin changes are
    refused until it is back (nothing acknowledged is lost)."""


class DeadlineExceededError(PoolError, TimeoutError):
    """A request did not complete before its deadline."""


class PoolOverloadedError(PoolError):
    """The pool's bounded request queue is full; retry later (gRPC RESOURCE_EXHAUSTED)."""


class ResourceLimitError(PoolError):
    """An admin request would take the pool past a limit of its spec (its memory budget,
    ``limits.max_pool_bytes``, or ``control.max_shards``); nothing changed (gRPC
    RESOURCE_EXHAUSTED)."""


class ShardNotReadyError(PoolError):
    """A shard is (re)loading its experts; the router retries the sub-batch."""


class PlacementMismatchError(ShardNotReadyError):
    """A sub-batch named experts a shard's places do not hold (the router's placement and
    the shard's layout disagree, e.g. a placement a router still used after its places were
    freed and reused): refused, never computed with the wrong experts; the router retries
    the sub-batch (another replica, or the same one once the placements agree)."""


class PoolExistsError(PoolError):
    """A pool of that name already runs in the cluster."""


# --- access --------------------------------------------------------------------------------


class AuthenticationError(RaymoeError):
    """No bearer token, or one the gateway does not know (gRPC UNAUTHENTICATED)."""


class PermissionDeniedError(RaymoeError):
    """A valid token that may not do this, e.g. a data-plane token on the admin plane
    (gRPC PERMISSION_DENIED)."""
