"""``pyfused-train`` (also ``python -m pyfused.train``): the seed's Fashion-MNIST ``fit()`` on the fused kernels.

The model is ``log_softmax(fc2(relu(fc1(x))))`` with 784 → 128 → 10 and no bias, trained with the mean NLL
loss and SGD (lr 0.15, momentum 0), batch 128, 10 epochs, from ``torch.manual_seed(420)``: the defaults. In
every configuration each batch is one :class:`~pyfused.train_step.FusedTrainStep` call (forward, loss, backward
and, at the end of each accumulation group, the FusedSGD update; in one process without accumulation, on CUDA
with the Triton kernels, the full-batch step is captured in a CUDA graph). The whole data set lives on the training device as one tensor; each epoch draws an on-device
permutation from a generator seeded with ``--seed`` and takes batches as slices of it, so no DataLoader runs
and the host reads the device only once per epoch (and, for the progress bar, at most twice a second).

``--reference`` trains the same model from the same seed and the same batches with plain PyTorch
(``nn.Sequential`` + ``F.nll_loss`` + ``torch.optim.SGD``), then prints both runs and the speed ratio.

``--accumulate K`` gives the train step K accumulation steps, and under ``torchrun`` (data-parallel over ranks,
:mod:`pyfused.cli.ranks`) it all-reduces over the WORLD process group. :func:`train` is the one loop for the fused
run and the eager reference, the step a pluggable callable (:mod:`pyfused.cli.steps`). Step ``i`` of an epoch takes
the global batch ``perm[i·B·W : (i+1)·B·W]`` (``B`` = ``--batch-size`` per rank, ``W`` ranks), rank r its
contiguous share (:meth:`pyfused.cli.ranks.Ranks.shard`; empty when the epoch's last global batch has fewer than W
rows); K consecutive global batches form one update, which uses the mean over its ``g`` batches (K, or the r < K
left at the end of an epoch, applied by ``flush()``) of each global batch's mean-loss gradient: with W ranks,
the same update as one process with batch ``B·W``. The eager loop gets the same update by dividing each batch's
summed loss by ``denom = rows · g`` (``rows`` in the global batch).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import math
import sys
import time
from pathlib import Path

import torch

from pyfused import backend, checks
from pyfused.cli import data, ranks as ranks_
from pyfused.cli.steps import build_fused, build_reference, fused_step, reference_step

EVAL_CHUNK = 8192
BAR_INTERVAL_S = 0.5

DESCRIPTION = """\
Train the seed's Fashion-MNIST classifier, x.view(-1, 784) -> Linear(784, 128, bias=False) -> ReLU ->
Linear(128, 10, bias=False) -> log_softmax with the mean NLL loss and SGD (lr 0.15, momentum 0), batch 128,
10 epochs, torch.manual_seed(420), on pyfused's fused MLP and SGD.
"""

EPILOG = """\
Each epoch prints: train_loss (mean loss of the epoch's batches), train_acc and test_acc (accuracy of the
model after the epoch on the whole train / test split), samples/s and time (the training steps only).

--save writes the state_dict of the model (keys fc1.weight, fc2.weight, and fc1.bias, fc2.bias with --bias).
It loads into any module with nn.Linear attributes fc1 and fc2, e.g. the seed's model:

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(784, 128, bias=False)
            self.fc2 = nn.Linear(128, 10, bias=False)
        def forward(self, x):
            return F.log_softmax(self.fc2(F.relu(self.fc1(x.view(-1, 784)))), dim=1)

    net = Net(); net.load_state_dict(torch.load("model.pt"))

or into pyfused.FusedMLP(784, 128, 10, bias=False). With --activation sigmoid, use F.sigmoid there and
pyfused.FusedMLP(..., activation="sigmoid"): the state_dict does not record the activation. With more hidden
layers (--hidden 13,8) the keys are fc1 ... fcL of pyfused.DeepFusedMLP(784, 13, 8, 10, activation=...).

Optimizers (--optimizer): sgd (FusedSGD; --lr 0.15, --momentum), adam and adamw (FusedAdam / FusedAdamW; --lr
1e-3, --weight-decay), applied inside FusedTrainStep's gradient kernel; --reference uses torch.optim's.

Gradient accumulation (--accumulate K): each SGD step uses the mean of the mean-loss gradients of K
consecutive batches (the eager loop: loss / K, backward, step and zero_grad every K batches). The batches left
at the end of an epoch, r < K of them, are one more step with the mean over those r (loss / r).

Data-parallel training: torchrun --nproc-per-node N -m pyfused.train ... (gloo on cpu, nccl on cuda, rank r on
cuda:LOCAL_RANK). --batch-size is per rank: every rank draws the same permutation (same --seed) and takes its
contiguous share of each global batch of N x batch-size rows; the fused step all-reduces each batch's loss
count and each update's gradients, so the run makes the updates of one process with batch N x batch-size.
Metrics are summed over the ranks; only rank 0 prints and writes --plot, --json and --save. --reference runs in
one process only.
"""


@dataclasses.dataclass
class EpochStats:
    """One epoch: the mean training loss over its batches (weighted by batch size), the accuracies of the model
    after the epoch on the whole train and test splits, and the training steps' throughput and time."""

    epoch: int
    train_loss: float
    train_acc: float
    test_acc: float
    samples_per_s: float
    seconds: float

    def line(self, epochs: int) -> str:
        return (f"epoch {self.epoch}/{epochs}  train_loss {self.train_loss:.6f}  "
                f"train_acc {100 * self.train_acc:.2f}%  test_acc {100 * self.test_acc:.2f}%  "
                f"samples/s {self.samples_per_s:,.0f}  time {self.seconds:.2f}s")


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


OPTIMIZERS = ("sgd", "adam", "adamw")


def _widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"every hidden width must be at least 1, got {text!r}")
    return widths


def _activations(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(","))
    for name in names:
        if name not in checks.ACTIVATIONS:
            raise argparse.ArgumentTypeError(f"activation must be one of {checks.ACTIVATIONS}, got {name!r}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyfused-train", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd",
                        help="sgd (the seed's), adam or adamw: pyfused.FusedSGD / FusedAdam / FusedAdamW, and "
                             "torch.optim's for --reference (default sgd)")
    parser.add_argument("--lr", type=_nonnegative_float, default=None,
                        help="learning rate (default 0.15 for sgd, the seed's; 1e-3 for adam and adamw, torch's)")
    parser.add_argument("--momentum", type=_nonnegative_float, default=0.0, help="SGD momentum (default 0)")
    parser.add_argument("--weight-decay", type=_nonnegative_float, default=None,
                        help="weight decay (default: the optimizer's, 0; 1e-2 for adamw)")
    parser.add_argument("--epochs", type=_int_at_least(1), default=10, help="epochs (default 10)")
    parser.add_argument("--batch-size", type=_int_at_least(1), default=128,
                        help="batch size, per rank under torchrun (default 128)")
    parser.add_argument("--accumulate", type=_int_at_least(1), default=1, metavar="K",
                        help="sum the gradients of K batches per SGD step, each batch's loss scaled by 1/K "
                             "(1/r for the r < K batches left at an epoch's end, which are stepped too); "
                             "default 1")
    parser.add_argument("--hidden", type=_widths, default=(128,), metavar="H[,H...]",
                        help="hidden units, one number per hidden layer: 128 (the seed), or 13,8 for two hidden "
                             "layers (default 128)")
    parser.add_argument("--bias", action="store_true", help="give both Linear layers a bias (default: none)")
    parser.add_argument("--activation", type=_activations, default=("relu",), metavar="A[,A...]",
                        help=f"the hidden layers' activation, one of {', '.join(checks.ACTIVATIONS)}, or one per "
                             "hidden layer, e.g. relu,sigmoid (default relu, the seed's)")
    parser.add_argument("--seed", type=int, default=420, help="torch.manual_seed for init and batches (default 420)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="training device; auto: cuda if available, else cpu")
    parser.add_argument("--data", choices=("auto", "fashion-mnist", "synthetic"), default="auto",
                        help="auto: Fashion-MNIST when present (or downloadable with --download), else the "
                             "synthetic stand-in, said on the first line; fashion-mnist: fail when absent")
    parser.add_argument("--data-dir", type=Path, default=data.default_data_dir(),
                        help="where Fashion-MNIST is (torchvision's layout: DIR/FashionMNIST/raw/*-ubyte[.gz]); "
                             "default %(default)s")
    parser.add_argument("--download", action="store_true", help="let torchvision download Fashion-MNIST")
    parser.add_argument("--limit", type=_int_at_least(1), default=None,
                        help="use only the first N samples of each split")
    parser.add_argument("--reference", action="store_true",
                        help="also train with plain PyTorch from the same seed and compare")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (also off when stdout is no terminal)")
    parser.add_argument("--plot", type=Path, metavar="PNG", help="write loss and accuracy per epoch as a PNG")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the metrics as JSON")
    parser.add_argument("--save", type=Path, metavar="PATH", help="write the trained state_dict (see below)")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if len(args.activation) == 1:
        args.activation = args.activation * len(args.hidden)
    elif len(args.activation) != len(args.hidden):
        parser.error(f"--activation: one name, or one per hidden layer ({len(args.hidden)}), got "
                     f"{len(args.activation)}")
    if args.lr is None:
        args.lr = 0.15 if args.optimizer == "sgd" else 1e-3
    if args.weight_decay is None:
        args.weight_decay = 1e-2 if args.optimizer == "adamw" else 0.0
    if args.optimizer != "sgd" and args.momentum:
        parser.error("--momentum is SGD's; adam and adamw take --lr and --weight-decay")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    if args.reference and ranks_.under_torchrun():
        parser.error("--reference: the plain-PyTorch comparison runs in one process, not under torchrun")
    return args


@torch.no_grad()
def count_correct(model, x, y) -> torch.Tensor:
    """The number of rows whose argmax of model(x) equals y, as a device tensor (no host sync)."""
    correct = torch.zeros((), dtype=torch.int64, device=y.device)
    for start in range(0, len(y), EVAL_CHUNK):
        correct += (model(x[start:start + EVAL_CHUNK]).argmax(1) == y[start:start + EVAL_CHUNK]).sum()
    return correct


def warm_up(model, make_step, dataset, args) -> None:
    """Run the step and the evaluation once on a copy, for every batch shape, so that one-time costs (kernel
    compilation, allocator growth, under torchrun the first collectives) stay out of the timings; the model
    and all RNG states are left untouched. ``make_step(twin, args)`` builds the step."""
    n = len(dataset.train_y)
    twin = copy.deepcopy(model)
    step = make_step(twin, args)
    scratch = torch.zeros((), dtype=torch.float64, device=dataset.train_y.device)
    for rows in {min(args.batch_size, n), n % args.batch_size} - {0}:
        step(dataset.train_x[:rows], dataset.train_y[:rows], float(rows), True, scratch)
    for rows in {min(EVAL_CHUNK, n), n % EVAL_CHUNK} - {0}:
        count_correct(twin, dataset.train_x[:rows], dataset.train_y[:rows])
    if dataset.train_x.is_cuda:
        torch.cuda.synchronize(dataset.train_x.device)


def train(model, step, dataset, args, show_bar: bool, ranks=None) -> list[EpochStats]:
    """Train for args.epochs with ``step`` (the interface of :mod:`pyfused.cli.steps`), printing one line per
    epoch on the main rank; returns the per-epoch stats, summed over the ranks. ``model`` (not its DDP
    wrapper) is what the accuracies are measured on, each rank on its share of the rows."""
    x_all, y_all = dataset.train_x, dataset.train_y
    ranks = ranks or ranks_.Ranks(x_all.device)
    n, k = len(y_all), args.accumulate
    batch = args.batch_size * ranks.world
    steps = math.ceil(n / batch)
    generator = torch.Generator(device=x_all.device).manual_seed(args.seed)
    tqdm = _tqdm() if show_bar and ranks.main else None
    train_rows, test_rows = ranks.shard(n), ranks.shard(len(dataset.test_y))
    history = []
    for epoch in range(1, args.epochs + 1):
        loss_sum = torch.zeros((), dtype=torch.float64, device=x_all.device)
        bar = tqdm(total=steps, desc=f"epoch {epoch}/{args.epochs}", unit="step", leave=False,
                   dynamic_ncols=True, file=sys.stderr) if tqdm else None
        start = last_shown = time.perf_counter()
        seen = 0
        perm = torch.randperm(n, generator=generator, device=x_all.device)
        for i in range(steps):
            rows = min(batch, n - i * batch)
            index = perm[i * batch:(i + 1) * batch][ranks.shard(rows)]
            group = min(k, steps - (i - i % k))
            step(x_all[index], y_all[index], rows * group, i % k == group - 1, loss_sum)
            seen += len(index)
            if bar is not None:
                bar.update()
                if time.perf_counter() - last_shown >= BAR_INTERVAL_S:
                    bar.set_postfix(loss=f"{loss_sum.item() / max(seen, 1):.4f}")
                    last_shown = time.perf_counter()
        if x_all.is_cuda:
            torch.cuda.synchronize(x_all.device)
        seconds = time.perf_counter() - start
        if bar is not None:
            bar.close()
        totals = torch.stack([loss_sum, count_correct(model, x_all[train_rows], y_all[train_rows]).double(),
                              count_correct(model, dataset.test_x[test_rows], dataset.test_y[test_rows]).double()])
        loss_total, train_correct, test_correct = ranks.sum(totals).tolist()
        history.append(EpochStats(epoch, loss_total / n, train_correct / n, test_correct / len(dataset.test_y),
                                  n / seconds, seconds))
        if ranks.main:
            print(history[-1].line(args.epochs), flush=True)
    return history


def _tqdm():
    from tqdm import tqdm
    return tqdm


def throughput(history: list[EpochStats]) -> float:
    """Training samples per second over all epochs."""
    return sum(s.samples_per_s * s.seconds for s in history) / sum(s.seconds for s in history)


def max_loss_rel_diff(ours: list[EpochStats], theirs: list[EpochStats]) -> float:
    return max(abs(a.train_loss - b.train_loss) / abs(b.train_loss) for a, b in zip(ours, theirs))


def write_plot(path: Path, runs: dict[str, list[EpochStats]]) -> None:
    """Two panels: train loss, and train/test accuracy, per epoch; one line style per run."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    for (name, history), style in zip(runs.items(), ("-", "--")):
        epochs = [s.epoch for s in history]
        loss_ax.plot(epochs, [s.train_loss for s in history], style, marker="o", label=f"{name} train")
        acc_ax.plot(epochs, [100 * s.train_acc for s in history], style, marker="o", label=f"{name} train")
        acc_ax.plot(epochs, [100 * s.test_acc for s in history], style, marker="s", label=f"{name} test")
    loss_ax.set(xlabel="epoch", ylabel="mean NLL loss", title="training loss")
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy after each epoch")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
    fig.savefig(path, dpi=100)


def _header(args, dataset, kernels: bool, ranks) -> str:
    path = "Triton kernels" if kernels else "torch path"
    batch = f"batch {args.batch_size}"
    if ranks.distributed:
        batch += f" per rank x {ranks.world} ranks ({ranks.backend})"
    if args.accumulate > 1:
        batch += f" x {args.accumulate} accumulated"
    return (f"pyfused-train: {dataset.describe()} | {args.device}, {path} | "
            f"{describe_net(args)} bias={args.bias} | {describe_optimizer(args)} | "
            f"{batch} | {args.epochs} epochs | seed {args.seed}")


def describe_net(args) -> str:
    """E.g. ``784-128-10 relu`` or ``784-13-8-10 relu,sigmoid``."""
    return f"{'-'.join(map(str, (784, *args.hidden, 10)))} {','.join(args.activation)}"


def describe_optimizer(args) -> str:
    name = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}[args.optimizer]
    extra = f" momentum={args.momentum:g}" if args.optimizer == "sgd" else ""
    return f"{name} lr={args.lr:g}{extra} weight_decay={args.weight_decay:g}"


def _compare(runs: dict[str, list[EpochStats]]) -> dict:
    """Print both runs' final metrics, the speed ratio and the loss agreement; return the last two."""
    ours, theirs = runs["pyfused"], runs["reference"]
    speedup = throughput(ours) / throughput(theirs)
    diff = max_loss_rel_diff(ours, theirs)
    for name, history in runs.items():
        last = history[-1]
        print(f"final {name:<9}  train_loss {last.train_loss:.6f}  train_acc {100 * last.train_acc:.2f}%  "
              f"test_acc {100 * last.test_acc:.2f}%  samples/s {throughput(history):,.0f}")
    print(f"speed ratio pyfused/reference {speedup:.2f}x  max relative train_loss difference {diff:.2e}", flush=True)
    return {"speedup": speedup, "max_loss_rel_diff": diff}


def run(args) -> int:
    """Set up the ranks (a process group under torchrun), train, write the outputs; the exit status."""
    ranks = ranks_.from_env(args.device)
    finished = False
    try:
        status = _run(args, ranks)
        finished = True
    finally:
        ranks.close(finished)
    return ranks.exit(status)  # a gloo rank ends its process here (see there)


def _run(args, ranks) -> int:
    """Load the data, train (and the reference), write the outputs on the main rank; the exit status."""
    device = ranks.device
    say = print if ranks.main else lambda *a, **k: None
    try:
        kernels = backend.use_triton(device, torch.float32)
        dataset, warning = data.load(args.data, args.data_dir, device, args.download, args.limit)
    except (data.DatasetNotFound, ValueError, RuntimeError) as err:
        print(f"pyfused-train: error: {err}", file=sys.stderr)
        return 1
    if warning:
        say(f"!!! WARNING: {warning} !!!", flush=True)
    say(_header(args, dataset, kernels, ranks), flush=True)
    show_bar = not args.quiet and sys.stdout.isatty()

    model, step = build_fused(args, ranks)
    warm_up(model, functools.partial(fused_step, ranks=ranks), dataset, args)
    if kernels and device.type == "cuda" and not step.train_step.accumulating:
        rows = min(args.batch_size, len(dataset.train_y))
        step.train_step.capture(dataset.train_x[:rows], dataset.train_y[:rows])
    runs = {"pyfused": train(model, step, dataset, args, show_bar, ranks)}
    if not ranks.main:
        return 0
    report = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "data": {"name": dataset.name, "source": dataset.source, "n_train": len(dataset.train_y),
                       "n_test": len(dataset.test_y), "warning": warning},
              "backend": "triton" if kernels else "torch", "world_size": ranks.world}
    if args.reference:
        print(f"reference run: nn.Sequential + F.nll_loss + torch.optim.{describe_optimizer(args).split()[0]}, same "
              "seed and batches", flush=True)
        ref_model, ref_step = build_reference(args, device)
        warm_up(ref_model, reference_step, dataset, args)
        runs["reference"] = train(ref_model, ref_step, dataset, args, show_bar)
        report.update(_compare(runs))
    report.update({name: [dataclasses.asdict(s) for s in history] for name, history in runs.items()})
    if args.plot:
        write_plot(args.plot, runs)
        print(f"wrote {args.plot}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.save:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        torch.save(state, args.save)
        print(f"wrote {args.save} (state_dict: {', '.join(state)})")
    return 0


def main(argv=None) -> int:
    """Console-script entry: the exit status (0 success, 1 run-time error such as missing data, 2 bad flags)."""
    try:
        args = parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
