"""A collective group between Ray actors that stays out of torch's default process group.

The policy trainer's default group belongs to DeepSpeed, and `ray.util.collective`'s GLOO backend
initialises the default group itself, so the two collide in one process. Like OpenRLHF's weight-sync
group, this builds a standalone gloo (CPU) or NCCL (CUDA) group from a TCP store whose address the
caller passes around through Ray.

The generation instances' KV group (sample migration) is one of these too, with a timeout of seconds. In the
pinned Ray (2.60), `ray.util.collective`'s GLOO group is `torch.distributed`'s default group plus subgroups:
its op timeout is torch's default (30 minutes; `gloo_timeout` only bounds the rendezvous), its send/recv carry
no tag, and a process can join one default group only, so the group cannot be rebuilt without a dead member.
Ray's tensor transport (`@ray.method(tensor_transport=...)`) rides on those same groups. A transfer to a dead
or stuck peer must fail in seconds and concurrent orders must not mix their messages, so the KV group uses
this class: its own store, its own timeout, tagged point-to-point messages, rebuilt freely. (On NCCL the timeout
is enforced by NCCL's watchdog, which aborts the group, and send/recv ignore tags: messages between one pair of
instances arrive in order, so two orders between the same pair must not overlap. Untested here: no GPU.)
"""
from __future__ import annotations

import datetime
import socket

import torch
import torch.distributed as dist


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def tcp_store(host: str, port: int, world_size: int, is_master: bool, timeout: datetime.timedelta) -> dist.TCPStore:
    """torch's TCPStore, with the master's server listening on `host` only: left to itself it listens on every
    interface, and a run on 127.0.0.1 must not be reachable from elsewhere."""
    if not is_master:
        return dist.TCPStore(host, port, world_size, False, timeout=timeout)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    return dist.TCPStore(host, port, world_size, True, timeout=timeout, master_listen_fd=sock.detach())


class CollectiveGroup:
    """Broadcast / send / recv of tensors among `world_size` processes; rank 0 hosts the store."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, name: str,
                 backend: str = "gloo", timeout_s: float = 300.0):
        timeout = datetime.timedelta(seconds=timeout_s)
        self.rank, self.world_size, self.backend = rank, world_size, backend
        # joining waits for every member to start; the ops' timeout (short for the KV group) bounds the transfers
        joining = datetime.timedelta(seconds=max(timeout_s, 60.0))
        self._store = tcp_store(host, port, world_size, rank == 0, joining)
        store = dist.PrefixStore(name, self._store)
        if backend == "nccl":  # NCCL's own default timeout is 10 minutes or more; its watchdog enforces this one
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self._pg = dist.ProcessGroupNCCL(store, rank, world_size, options)
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self._pg = dist.ProcessGroupGloo(store, rank, world_size, timeout)
            self.device = torch.device("cpu")

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        self._pg.broadcast([tensor], opts).wait()
        return tensor

    def send(self, tensor: torch.Tensor, dst: int, tag: int = 0) -> None:
        self._pg.send([tensor.contiguous()], dst, tag).wait()

    def recv(self, tensor: torch.Tensor, src: int, tag: int = 0) -> torch.Tensor:
        self._pg.recv([tensor], src, tag).wait()
        return tensor

    def barrier(self) -> None:
        self.broadcast(torch.zeros(1, device=self.device), src=0)
