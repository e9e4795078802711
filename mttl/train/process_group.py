"""The training workers' torch.distributed process group, kept on 127.0.0.1 when the run is local.

Ray Train's own setup has rank 0 start torch's TCPStore, which listens on every interface of the
machine (`*:port`) whatever address it is given, and leaves gloo to pick an interface from the
host name. When every worker runs on a loopback node (a cluster mttl started on 127.0.0.1) this
backend instead opens the store's socket on 127.0.0.1 itself and hands it to TCPStore, and points
gloo at the loopback interface, so nothing a local run opens is reachable from the network.
Workers on real node addresses get Ray Train's setup unchanged.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket

from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

# rank 0's listening socket and store: they must outlive the setup call that creates them
_LOOPBACK_STORE: dict = {}


class LocalTorchConfig(TorchConfig):
    """`TorchConfig` whose process group listens on loopback only for a run on loopback nodes."""

    @property
    def backend_cls(self):
        return _LocalTorchBackend


class _LocalTorchBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: TorchConfig):
        import ray

        addresses = worker_group.execute(_node_address)
        if not all(ipaddress.ip_address(address).is_loopback for address in addresses):
            return super().on_start(worker_group, backend_config)
        backend = backend_config.backend
        if backend is None:
            backend = "nccl" if worker_group.get_resources_per_worker().get("GPU", 0) > 0 else "gloo"
        world = len(worker_group)
        port = worker_group.execute_single(0, _serve_loopback_store, world, backend_config.timeout_s)
        worker_group.execute(_set_torch_distributed_env_vars)
        ray.get([worker_group.execute_single_async(rank, _join_process_group, backend, rank, world, port,
                                                  backend_config.timeout_s)
                 for rank in range(world)])


def _node_address() -> str:
    import ray

    return ray.util.get_node_ip_address()


def loopback_interface() -> str:
    """The name of the interface holding 127.0.0.1 (`lo` on Linux, `lo0` on macOS)."""
    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address.startswith("127.") for a in addresses):
            return name
    return "lo"


def _serve_loopback_store(world_size: int, timeout_s: int) -> int:
    """Rank 0: a TCPStore server on a socket bound to 127.0.0.1; returns its port."""
    import torch.distributed as dist

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(max(128, world_size))
    port = sock.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=True, master_listen_fd=sock.fileno(),
                          wait_for_workers=False, timeout=datetime.timedelta(seconds=timeout_s))
    _LOOPBACK_STORE.update(socket=sock, store=store)
    return port


def _join_process_group(backend: str, rank: int, world_size: int, port: int, timeout_s: int) -> None:
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    store = _LOOPBACK_STORE.get("store") if rank == 0 else None
    if store is None:
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=timeout)
    # what env:// would have set, for libraries that read it (DeepSpeed)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback_interface())
    if backend == "nccl":
        # fail on a timed-out collective instead of hanging, as Ray Train's own setup does
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
