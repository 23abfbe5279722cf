"""What the three examples share: the --rnn nn|fused switch, device choice, seeding, the progress
bar, curve plots, checkpoints that load into either --rnn choice, DDP set-up and the final line."""
import argparse
import json
import math
import os
import random
import time

import torch
from torch import nn

import fused_rnn


def add_common_args(p: argparse.ArgumentParser, *, epochs, batch_size, lr, out):
    g = p.add_argument_group("common")
    g.add_argument("--rnn", choices=["nn", "fused"], default="fused",
                   help="recurrent layers from torch.nn or from fused_rnn (same weights, same state_dict)")
    g.add_argument("--backend", default="auto", choices=["auto", *fused_rnn.BACKENDS],
                   help="fused_rnn backend (with --rnn fused)")
    g.add_argument("--preset", choices=["auto", *PRESETS], default="auto",
                   help="sizes of data, model and training: gpu (the defaults shown here), cpu (a result worth "
                        "showing in <= 15 min on a 2-core CPU, one thread), quick (about a minute, for tests); "
                        "auto: gpu when the device is a GPU, else cpu")
    g.add_argument("--quick", action="store_true", help="same as --preset quick")
    g.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1 ...")
    g.add_argument("--epochs", type=int, default=epochs)
    g.add_argument("--batch-size", type=int, default=batch_size)
    g.add_argument("--lr", type=float, default=lr)
    g.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                   help="cosine: the learning rate falls from --lr to 0 along a half cosine over all the steps")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-steps", type=int, default=0, help="stop after this many optimizer steps (0: no limit)")
    g.add_argument("--data-file", default=None, help="use this file instead of the downloaded data set")
    g.add_argument("--out", default=out, help="folder for the checkpoint and the PNG plots")
    g.add_argument("--load", default=None, help="start from this checkpoint (saved with either --rnn)")
    g.add_argument("--no-plot", action="store_true")
    g.add_argument("--no-save", action="store_true")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    g.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default; the cpu and quick presets use 1: small models "
                        "on a shared CPU run as fast on one thread as on oversubscribed ones)")
    return p


PRESETS = ("gpu", "cpu", "quick")


def preset_name(args):
    """--quick, else --preset, where auto means gpu on a CUDA device and cpu otherwise."""
    if args.quick:
        return "quick"
    if args.preset != "auto":
        return args.preset
    device = args.device
    if device == "auto" and "LOCAL_RANK" in os.environ and torch.cuda.is_available():
        device = "cuda"
    return "gpu" if pick_device(device).type == "cuda" else "cpu"


def apply_preset(args, parser, presets: dict):
    """Replace the parser's defaults (the gpu preset) with those of the chosen preset, presets[name],
    except the ones given on the command line; args.preset says which preset was applied."""
    args.preset = preset_name(args)
    for k, v in presets.get(args.preset, {}).items():
        if getattr(args, k) == parser.get_default(k):
            setattr(args, k, v)
    return args


def lr_scheduler(opt, args, steps_per_epoch):
    """Called after every optimizer step: --lr-schedule over --epochs x steps_per_epoch steps."""
    total = max(args.epochs * steps_per_epoch, 1)
    if args.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step / total, 1))))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)


def pick_device(name="auto"):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)


def rnn_layer(args, kind, *a, **kw):
    """torch.nn.<kind>(*a, **kw) or fused_rnn.<kind>(*a, backend=args.backend, **kw):
    kind is LSTM, GRU, RNN, LSTMCell, GRUCell or RNNCell. Both create the same parameters with the
    same initialisation from the same random numbers, so a seed gives the same model either way."""
    if args.rnn == "nn":
        return getattr(nn, kind)(*a, **kw)
    return getattr(fused_rnn, kind)(*a, backend=args.backend, **kw)


def describe(args, cell="lstm"):
    if args.rnn == "nn":
        return "torch.nn"
    from fused_rnn import backends
    name = args.backend
    if name == "auto":
        try:
            name = "auto -> " + backends.resolve("auto", args.device_obj, torch.float32, cell, False)
        except Exception:  # noqa: BLE001 - only a label
            pass
    return f"fused_rnn ({name})"


def progress(iterable, args, **kw):
    if args.no_progress or not is_main_process():
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, dynamic_ncols=True, leave=False, **kw)


def log(*a):
    if is_main_process():
        print(*a, flush=True)


class EpochTimer:
    """Wall time of each epoch's training (synchronising CUDA), evaluation excluded."""

    def __init__(self, device):
        self.device, self.times, self._t = device, [], None

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self):
        self._sync()
        self._t = time.perf_counter()

    def stop(self):
        self._sync()
        self.times.append(time.perf_counter() - self._t)
        return self.times[-1]

    @property
    def per_epoch(self):
        # the first epoch pays for warm-up (allocations, kernel choice); report the later ones when there are
        t = self.times[1:] if len(self.times) > 1 else self.times
        return sum(t) / len(t) if t else float("nan")


def plot_curves(path, title, curves: dict):
    """curves: {panel title: {series label: (x list, y list)}} -> one PNG, one panel each."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.6), squeeze=False)
    for ax, (panel, series) in zip(axes[0], curves.items()):
        for label, (x, y) in series.items():
            if len(x):
                ax.plot(x, y, label=label, marker="o" if len(x) < 30 else None, markersize=3)
        ax.set_title(panel)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_checkpoint(path, model, args, **extra):
    """Weights plus what rebuilds the model (hyper-parameters, vocabulary). The state_dict of a
    torch.nn model and of a fused_rnn model have the same keys and shapes, so either loads the other."""
    model = unwrap(model)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    hparams = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}
    torch.save({"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "args": hparams, **extra}, path)
    return path


def load_checkpoint(path, map_location="cpu"):
    return torch.load(path, map_location=map_location, weights_only=True)


def load_weights(model, ckpt):
    unwrap(model).load_state_dict(ckpt["model"], strict=True)


def unwrap(model):
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def final_line(example, args, metric_name, metric, epoch_times, extra=""):
    per_epoch = (sum(epoch_times[1:]) / len(epoch_times[1:]) if len(epoch_times) > 1
                 else (epoch_times[0] if epoch_times else float("nan")))
    line = (f"FINAL {example} rnn={args.rnn} backend={args.backend} device={args.device_obj.type} "
            f"preset={getattr(args, 'preset', 'n/a')} "
            f"{metric_name}={metric:.4g} time/epoch={f'{per_epoch:.2f}s' if epoch_times else 'n/a'} "
            f"epochs={len(epoch_times)}"
            + (f" {extra}" if extra else ""))
    log(line)
    return line


def write_json(path, obj):
    if is_main_process():
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(obj, f, indent=1, default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o))


def setup(args):
    """Device, threads, seed; under torchrun also the process group (gloo on CPU, nccl on CUDA)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not torch.distributed.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if args.device == "auto" and torch.cuda.is_available():
            args.device = f"cuda:{local}"
        dev = pick_device(args.device)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    args.device_obj = pick_device(args.device)
    seed_everything(args.seed)
    return args.device_obj


def world():
    d = torch.distributed
    return (d.get_rank(), d.get_world_size()) if d.is_available() and d.is_initialized() else (0, 1)


def is_main_process():
    return world()[0] == 0


def teardown():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
