"""Peer memory: symmetric workspaces shared by the ranks of a process group."""
from .peer_memory import PeerMemory

__all__ = ["PeerMemory"]
