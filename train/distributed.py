"""Process-group setup for every launcher: python (1 process), deepspeed, torchrun, SLURM.

Call `prepare_environment()` before importing deepspeed: without a GPU it selects DeepSpeed's CPU
accelerator and the gloo backend, so `deepspeed --num_gpus 2 launch/pretrain.py` gives 2 CPU ranks.
"""
from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass

import torch


@dataclass
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_env() -> None:
    """Translate SLURM's variables (srun, one task per GPU) into torch.distributed's."""
    if "SLURM_PROCID" not in os.environ or "RANK" in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ.get("SLURM_NTASKS", "1")
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in os.environ:
        nodes = os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1")
        try:
            first = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                                   check=True).stdout.split()[0]
        except (OSError, subprocess.CalledProcessError, IndexError):
            first = nodes.split(",")[0]
        os.environ["MASTER_ADDR"] = first
    os.environ.setdefault("MASTER_PORT", str(29500 + int(os.environ.get("SLURM_JOB_ID", "0")) % 1000))


_PICKED_PORT = "CLIPDINO_PICKED_PORT"  # set when we chose MASTER_PORT ourselves (a world of one)


def prepare_environment() -> None:
    """Environment variables every launcher path needs; safe to call more than once."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    _slurm_env()
    if "RANK" not in os.environ:  # plain `python launch/pretrain.py`: a world of one
        if "MASTER_PORT" not in os.environ:
            os.environ[_PICKED_PORT] = "1"
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    os.environ.setdefault("LOCAL_RANK", "0")


def init_distributed() -> DistInfo:
    prepare_environment()
    import deepspeed

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    for attempt in range(5):
        try:
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
            break
        except torch.distributed.DistNetworkError:
            # the free port we picked was taken between picking and binding (another process on the machine):
            # pick again; a port the user or a launcher chose is theirs, so that error stands
            if not os.environ.get(_PICKED_PORT) or attempt == 4:
                raise
            os.environ["MASTER_PORT"] = str(_free_port())
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        _unlink_cpu_allreduce_buffer(rank)
        if "OMP_NUM_THREADS" not in os.environ:
            # ranks sharing a CPU machine split its cores instead of oversubscribing them
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local_world, 1)))
    return DistInfo(rank, world, local_rank, device, backend)


def _unlink_cpu_allreduce_buffer(rank: int) -> None:
    """DeepSpeed's CPU shared-memory all-reduce puts a 67 MB file per rank in /dev/shm (RAM) and never removes it.
    Every rank has mapped every file once `deepspeed.init_distributed` returns, so after a barrier each rank unlinks
    its own: the mappings stay valid and the memory goes back to the system when the ranks exit, crash included."""
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    barrier()
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except FileNotFoundError:  # ranks on several machines, or a DeepSpeed built without the shm op
        pass


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def broadcast_object(obj, src: int = 0):
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def run_on_main(fn, *args, **kwargs):
    """Run `fn` on rank 0 only and hand its result to every rank. If it raises, every rank raises the same
    error type with its message, instead of the other ranks hanging at the next collective."""
    result, error = None, None
    if int(os.environ.get("RANK", "0")) == 0:
        try:
            result = fn(*args, **kwargs)
        except Exception as e:  # re-raised below, on every rank
            error = (type(e), str(e))
    result, error = broadcast_object((result, error))
    if error is not None:
        kind, message = error
        raise (kind if isinstance(kind, type) and issubclass(kind, Exception) else RuntimeError)(message)
    return result
