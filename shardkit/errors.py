"""Exceptions raised by shardkit."""


class ShardkitError(RuntimeError):
    """Base class of shardkit's errors."""


class CollectiveError(ShardkitError):
    """A peer-memory collective failed on this rank (timeout, or ranks disagreed about the call).

    The communicator that raised it is unusable afterwards: its ranks may disagree about how many
    calls completed. Create a new one (a new PeerMemory) to continue.
    """
