"""Data-parallel training (DistributedDataParallel, torchrun) and gradient accumulation (``--accumulate``).

Two ranks run on the CPU with gloo, as spawned processes that meet on a free loopback port (127.0.0.1 only),
each with one intra-op thread; every result is compared with one process training on the whole batch.
Tolerances (float32): the distributed and single-process runs differ only in how the batch's gradient sum is
split and ordered (two partial sums all-reduced, or averaged by DDP, vs one sum), so parameters agree to
rounding: ``rtol=1e-5, atol=1e-6`` after every run here (the largest absolute difference measured on CPU was
3e-8).
"""
import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pyfused import FusedAdam, FusedMLP, FusedSGD
from pyfused.cli import data, train
from pyfused.backend import interpreting
from pyfused.train_step import FusedTrainStep

TOL = dict(rtol=1e-5, atol=1e-6)
EPOCH_LINE = re.compile(r"^epoch \d+/\d+  train_loss ", re.MULTILINE)
SHAPE = (12, 8, 5)  # in, hidden, out of the DDP tests' FusedMLP
GLOBAL_BATCH, STEPS, LR, MOMENTUM = 8, 4, 0.1, 0.9


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One intra-op thread here and in the spawned ranks: on a busy 2-core machine, OpenMP barriers waiting
    for a descheduled thread make these tiny batches many times slower."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ddp_batches(device):
    """STEPS global batches (x, target) of GLOBAL_BATCH rows, the same in every process."""
    gen = torch.Generator().manual_seed(7)
    return [(torch.randn(GLOBAL_BATCH, SHAPE[0], generator=gen).to(device),
             torch.randint(0, SHAPE[2], (GLOBAL_BATCH,), generator=gen).to(device)) for _ in range(STEPS)]


def fresh_model(device):
    torch.manual_seed(3)
    return FusedMLP(*SHAPE, device=device)


def init_rank(rank, world, port, backend_name, device_type):
    """Join the process group of ``world`` spawned ranks; this rank's device."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device(device_type)
    if device_type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend_name, rank=rank, world_size=world)
    return device


def ddp_worker(rank, world, port, backend_name, device_type, pyfused_backends, out_dir):
    """Plain user code: DDP(FusedMLP) + FusedSGD on this rank's contiguous share of each global batch, once per
    pyfused backend (one process group for all: spawning the ranks is what costs)."""
    device = init_rank(rank, world, port, backend_name, device_type)
    try:
        for pyfused_backend in pyfused_backends:
            os.environ["PYFUSED_BACKEND"] = pyfused_backend
            model = fresh_model(device)
            net = DistributedDataParallel(model, device_ids=[rank] if device_type == "cuda" else None)
            optimizer = FusedSGD(net.parameters(), lr=LR, momentum=MOMENTUM)
            share = GLOBAL_BATCH // world
            for x, target in ddp_batches(device):
                rows = slice(rank * share, (rank + 1) * share)
                F.nll_loss(net(x[rows]), target[rows]).backward()
                optimizer.step()
                optimizer.zero_grad()
            torch.save({k: v.cpu() for k, v in model.state_dict().items()},
                       os.path.join(out_dir, f"{pyfused_backend}-rank{rank}.pt"))
        dist.barrier()  # a gloo rank that tears down while its peer still runs may abort at exit
    finally:
        dist.destroy_process_group()


def single_process_state(device):
    model = fresh_model(device)
    optimizer = FusedSGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    for x, target in ddp_batches(device):
        F.nll_loss(model(x), target).backward()
        optimizer.step()
        optimizer.zero_grad()
    return {k: v.cpu() for k, v in model.state_dict().items()}


def check_ddp_against_one_process(world, backend_name, device_type, pyfused_backends, tmp_path, monkeypatch):
    mp.spawn(ddp_worker, args=(world, free_port(), backend_name, device_type, pyfused_backends, str(tmp_path)),
             nprocs=world)
    for pyfused_backend in pyfused_backends:
        monkeypatch.setenv("PYFUSED_BACKEND", pyfused_backend)
        expected = single_process_state(device_type)
        for rank in range(world):
            state = torch.load(tmp_path / f"{pyfused_backend}-rank{rank}.pt")
            assert state.keys() == expected.keys()
            for name in expected:
                torch.testing.assert_close(state[name], expected[name], **TOL,
                                           msg=lambda m: f"{pyfused_backend}, rank {rank}, {name}: {m}")


# Triton's kernels take CPU tensors only under its interpreter (set by conftest on machines without CUDA).
CPU_BACKENDS = ("torch", "triton") if interpreting() else ("torch",)


def test_ddp_fused_mlp_two_gloo_ranks_equal_one_process_on_the_whole_batch(tmp_path, monkeypatch):
    check_ddp_against_one_process(2, "gloo", "cpu", CPU_BACKENDS, tmp_path, monkeypatch)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nccl needs a CUDA device")
def test_ddp_fused_mlp_single_nccl_rank_equals_one_process(tmp_path, monkeypatch):
    check_ddp_against_one_process(1, "nccl", "cuda", ("triton",), tmp_path, monkeypatch)


# ---------------------------------------------------------------- FusedTrainStep with a process group
STEP_ROWS, STEP_BATCHES = 9, 4  # odd global batches: shares of 4 and 5 rows; 4 batches: k = 3 leaves a group of 1


STEP_CASES = {  # name: (model head, loss, optimizer): momentum SGD on the NLL; Adam on the MSE of a logits model
    "sgd-nll": (True, "nll", lambda params: FusedSGD(params, lr=LR, momentum=MOMENTUM)),
    "adam-mse": (False, "mse", lambda params: FusedAdam(params, lr=0.01, weight_decay=0.01, amsgrad=True)),
}


def step_batches(device, loss):
    """STEP_BATCHES global batches with every 4th class target ignored, so the ranks count different numbers of
    rows (MSE: float targets, the ranks' elements differ)."""
    gen = torch.Generator().manual_seed(11)
    out = []
    for _ in range(STEP_BATCHES):
        x = torch.randn(STEP_ROWS, SHAPE[0], generator=gen)
        t = torch.randint(0, SHAPE[2], (STEP_ROWS,), generator=gen)
        t[::4] = -100
        if loss == "mse":
            t = torch.randn(STEP_ROWS, SHAPE[2], generator=gen)
        out.append((x.to(device), t.to(device)))
    return out


def train_with_step(device, k, case, process_group=None, rows=slice(None)):
    """FusedTrainStep(model, optimizer, process_group, k) of ``case`` over ``rows`` of every step batch, flushed
    at the end; (state_dict, the optimizer's state tensors, losses) on the CPU."""
    log_softmax, loss, make_optimizer = STEP_CASES[case]
    torch.manual_seed(3)
    model = FusedMLP(*SHAPE, device=device, log_softmax=log_softmax)
    optimizer = make_optimizer(model.parameters())
    step = FusedTrainStep(model, optimizer, process_group, k, loss=loss)
    losses = [step(x[rows], t[rows]) for x, t in step_batches(device, loss)]
    step.flush()
    states = [v.cpu() for p in model.parameters() for v in optimizer.state[p].values()]
    return {k: v.cpu() for k, v in model.state_dict().items()}, states, torch.stack(losses).cpu()


def step_worker(rank, world, port, backend_name, device_type, pyfused_backends, out_dir):
    """FusedTrainStep with the WORLD group on this rank's contiguous share (4 or 5 of 9 rows), k = 1 and 3."""
    device = init_rank(rank, world, port, backend_name, device_type)
    try:
        rows = slice(STEP_ROWS * rank // world, STEP_ROWS * (rank + 1) // world)
        for pyfused_backend in pyfused_backends:
            os.environ["PYFUSED_BACKEND"] = pyfused_backend
            for case in STEP_CASES:
                for k in (1, 3):
                    torch.save(train_with_step(device, k, case, dist.group.WORLD, rows),
                               os.path.join(out_dir, f"step-{pyfused_backend}-{case}-{k}-rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def check_step_against_one_process(world, backend_name, device_type, pyfused_backends, tmp_path, monkeypatch):
    """Every rank ends with the parameters, optimizer state and (global) losses of one process that steps on the
    whole batches: the ranks' gradients are all-reduced and the mean is over all counted rows (or elements)."""
    mp.spawn(step_worker, args=(world, free_port(), backend_name, device_type, pyfused_backends, str(tmp_path)),
             nprocs=world)
    for pyfused_backend in pyfused_backends:
        monkeypatch.setenv("PYFUSED_BACKEND", pyfused_backend)
        for case in STEP_CASES:
            for k in (1, 3):
                expected = train_with_step(device_type, k, case)
                for rank in range(world):
                    state, states, losses = torch.load(tmp_path / f"step-{pyfused_backend}-{case}-{k}-rank{rank}.pt")
                    where = f"{pyfused_backend}, {case}, k={k}, rank {rank}"
                    for name in expected[0]:
                        torch.testing.assert_close(state[name], expected[0][name], **TOL,
                                                   msg=lambda m: f"{where} {name}: {m}")
                    assert len(states) == len(expected[1])
                    for ours, theirs in zip(states, expected[1]):
                        torch.testing.assert_close(ours, theirs, **TOL, msg=lambda m: f"{where} state: {m}")
                    torch.testing.assert_close(losses, expected[2], **TOL, msg=lambda m: f"{where} losses: {m}")


def test_train_step_two_gloo_ranks_equal_one_process_on_the_whole_batch(tmp_path, monkeypatch):
    check_step_against_one_process(2, "gloo", "cpu", CPU_BACKENDS, tmp_path, monkeypatch)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nccl needs a CUDA device")
def test_train_step_single_nccl_rank_equals_one_process(tmp_path, monkeypatch):
    check_step_against_one_process(1, "nccl", "cuda", ("triton",), tmp_path, monkeypatch)


# ---------------------------------------------------------------- the CLI: --accumulate and torchrun
CLI = ["--data", "synthetic", "--device", "cpu", "--momentum", "0.9", "--quiet"]


def eager_accumulation(k, n, batch, epochs, seed=420, lr=0.15, momentum=0.9):
    """The course's loop on the CLI's data and batches: loss / g, backward per batch, step and zero_grad after
    each group of g batches (g = k, or the r < k batches left at the end of an epoch)."""
    x, y = data.synthetic_split("train", n)
    torch.manual_seed(seed)
    fc1, fc2 = nn.Linear(784, 128, bias=False), nn.Linear(128, 10, bias=False)
    net = nn.Sequential(fc1, nn.ReLU(), fc2, nn.LogSoftmax(dim=1))
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        batches = torch.randperm(n, generator=generator).split(batch)
        for start in range(0, len(batches), k):
            group = batches[start:start + k]
            for index in group:
                (F.nll_loss(net(x[index]), y[index]) / len(group)).backward()
            optimizer.step()
            optimizer.zero_grad()
    return {"fc1.weight": fc1.weight.detach(), "fc2.weight": fc2.weight.detach()}


@pytest.mark.parametrize("k", [1, 3, 8])
def test_accumulate_equals_the_eager_accumulation_loop(k, tmp_path, capsys, monkeypatch):
    # 200 rows in batches of 16: 13 batches (the last of 8 rows), so k=3 ends each epoch with a group of 1
    # and k=8 with a group of 5; k=1 runs FusedTrainStep, k>1 the eager loop over FusedMLP + FusedSGD.
    monkeypatch.setenv("PYFUSED_BACKEND", "torch")
    pt = tmp_path / "model.pt"
    argv = [*CLI, "--limit", "200", "--batch-size", "16", "--epochs", "2", "--accumulate", str(k), "--save", str(pt)]
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    assert len(EPOCH_LINE.findall(out)) == 2
    assert (f"x {k} accumulated" in out.splitlines()[0]) == (k > 1)
    state = torch.load(pt)
    for name, expected in eager_accumulation(k, 200, 16, 2).items():
        torch.testing.assert_close(state[name], expected, **TOL, msg=name)


def test_accumulate_flag_errors(capsys, monkeypatch):
    assert train.main(["--accumulate", "0"]) == 2
    assert "argument --accumulate: must be at least 1, got 0" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train.main(["--reference"]) == 2
    assert "--reference: the plain-PyTorch comparison runs in one process" in capsys.readouterr().err


def check_torchrun_against_one_process(nproc, device, tol, tmp_path, capsys):
    """``torchrun --nproc-per-node nproc -m pyfused.train`` with 16 rows per rank and --accumulate 3 against
    one in-process run with batch 16·nproc and the same accumulation (same permutation, same updates)."""
    common = ["--data", "synthetic", "--device", device, "--momentum", "0.9", "--quiet", "--limit", "501",
              "--epochs", "1", "--accumulate", "3"]
    dist_json, dist_pt = tmp_path / "dist.json", tmp_path / "dist.pt"
    proc = subprocess.run(
        # --standalone: the agent binds a free port itself (no window between choosing a port and binding it)
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
         "-m", "pyfused.train", *common, "--batch-size", "16",
         "--json", str(dist_json), "--save", str(dist_pt)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(EPOCH_LINE.findall(proc.stdout)) == 1, proc.stdout
    assert proc.stdout.count("pyfused-train: synthetic") == 1
    process_group = "nccl" if device == "cuda" else "gloo"
    assert f"batch 16 per rank x {nproc} ranks ({process_group}) x 3 accumulated" in proc.stdout
    assert proc.stdout.count(f"wrote {dist_json}") == 1

    one_json, one_pt = tmp_path / "one.json", tmp_path / "one.pt"
    argv = [*common, "--batch-size", str(16 * nproc), "--json", str(one_json), "--save", str(one_pt)]
    assert train.main(argv) == 0
    capsys.readouterr()
    dist_report, one_report = json.loads(dist_json.read_text()), json.loads(one_json.read_text())
    assert dist_report["world_size"] == nproc and one_report["world_size"] == 1
    (ours,), (theirs,) = dist_report["pyfused"], one_report["pyfused"]
    torch.testing.assert_close(ours["train_loss"], theirs["train_loss"], rtol=tol["rtol"], atol=0)
    for metric in ("train_acc", "test_acc"):  # a rounding-level tie may flip one of the 501 samples
        torch.testing.assert_close(ours[metric], theirs[metric], rtol=0, atol=1.5 / 501)
    dist_state, one_state = torch.load(dist_pt), torch.load(one_pt)
    assert dist_state.keys() == one_state.keys()
    for name in one_state:
        torch.testing.assert_close(dist_state[name], one_state[name], **tol, msg=name)


def test_torchrun_two_gloo_ranks_equal_one_process_with_the_whole_batch(tmp_path, capsys, monkeypatch):
    # 501 rows, 16 per rank: 16 global batches of 32 (the last of 21 rows: 10 on rank 0, 11 on rank 1) in
    # groups of 3 (the last a group of 1): FusedTrainStep with the WORLD group, uneven shards, a flushed group.
    monkeypatch.setenv("PYFUSED_BACKEND", "torch")
    check_torchrun_against_one_process(2, "cpu", TOL, tmp_path, capsys)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nccl needs a CUDA device")
def test_torchrun_single_nccl_rank_equals_one_process(tmp_path, capsys):
    # The Triton kernels on both sides; looser than TOL in case a kernel's reduction order is not fixed.
    check_torchrun_against_one_process(1, "cuda", dict(rtol=1e-4, atol=1e-5), tmp_path, capsys)
