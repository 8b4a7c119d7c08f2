"""The standalone collective group moves tensors exactly between Ray actors, beside a default group."""
import ray
import torch


@ray.remote(num_cpus=0)
class Peer:
    def __init__(self, with_default_group: bool, port: int = 0):
        if with_default_group:  # like a DeepSpeed rank: a default group of its own must not interfere
            import torch.distributed as dist

            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)

    def join(self, host, port, rank, world):
        from migration.collective import CollectiveGroup

        self.group = CollectiveGroup(host, port, rank, world, "test")
        return rank

    def broadcast(self, shape, seed):
        tensor = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) if self.group.rank == 0 \
            else torch.zeros(shape)
        return self.group.broadcast(tensor, src=0)

    def send_recv(self, shape):
        if self.group.rank == 1:
            self.group.send(torch.arange(float(torch.Size(shape).numel())).reshape(shape), dst=2)
            return None
        if self.group.rank == 2:
            return self.group.recv(torch.empty(shape), src=1)
        return None


def test_broadcast_and_point_to_point(ray_cluster):
    from migration.collective import free_port

    peers = [Peer.remote(True, free_port()), Peer.remote(False), Peer.remote(False)]
    port = free_port()
    ray.get([p.join.remote("127.0.0.1", port, r, 3) for r, p in enumerate(peers)])
    got = ray.get([p.broadcast.remote((3, 5, 7), 11) for p in peers])
    expected = torch.randn((3, 5, 7), generator=torch.Generator().manual_seed(11))
    for tensor in got:
        assert torch.equal(tensor, expected)
    out = ray.get([p.send_recv.remote((4, 6)) for p in peers])
    assert torch.equal(out[2], torch.arange(24.0).reshape(4, 6))
    for p in peers:
        ray.kill(p)
