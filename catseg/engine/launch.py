"""Multi-process launch: detectron2's `launch`, plus CPU (gloo) runs on machines with CUDA.

detectron2's launcher picks NCCL whenever CUDA is available. A run with MODEL.DEVICE "cpu"
needs gloo regardless, so for it we spawn the workers ourselves with the same rank layout and
local process group as detectron2. Without CUDA, detectron2's own launcher already uses gloo.

Either way each worker closes its process groups once `main_func` returns: a gloo worker that
exits with its group still open can abort (SIGABRT, "terminate called without an active
exception") while the interpreter shuts down, failing a run that had finished its work.
"""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch as d2_launch
from detectron2.engine.launch import DEFAULT_TIMEOUT, _find_free_port
from detectron2.utils import comm


def _cpu_worker(local_rank, main_func, world_size, procs_per_machine, machine_rank, dist_url, args, timeout):
    dist.init_process_group(backend="gloo", init_method=dist_url, world_size=world_size,
                            rank=machine_rank * procs_per_machine + local_rank, timeout=timeout)
    comm.create_local_process_group(procs_per_machine)
    comm.synchronize()
    main_func(*args)


def _run_then_close(main_func, *args):
    """`main_func(*args)`; then, in a multi-process run, wait for every rank and destroy the
    process groups (default and local) before the worker exits."""
    result = main_func(*args)
    if dist.is_initialized():
        comm.synchronize()
        dist.destroy_process_group()
    return result


def launch(main_func, num_processes_per_machine: int, num_machines: int = 1, machine_rank: int = 0,
           dist_url: str = "auto", args=(), device: str = "cuda", timeout=DEFAULT_TIMEOUT):
    """Run `main_func(*args)` in num_processes_per_machine x num_machines processes.

    `device` is MODEL.DEVICE: "cpu" forces the gloo backend even where CUDA is available.
    """
    world_size = num_processes_per_machine * num_machines
    if world_size == 1 or not (device == "cpu" and torch.cuda.is_available()):
        return d2_launch(_run_then_close, num_processes_per_machine, num_machines=num_machines,
                         machine_rank=machine_rank, dist_url=dist_url, args=(main_func, *args),
                         timeout=timeout)
    if dist_url == "auto":
        assert num_machines == 1, "dist_url=auto needs a single machine"
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    mp.start_processes(_cpu_worker, nprocs=num_processes_per_machine, daemon=False,
                       args=(_run_then_close, world_size, num_processes_per_machine, machine_rank,
                             dist_url, (main_func, *args), timeout))
