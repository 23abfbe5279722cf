"""`python -m fused_rnn`: which backends run here (and why others do not), each checked against
torch.nn on random inputs, and a small speed table against torch.nn."""
import argparse
import os
import platform
import warnings

import torch

import fused_rnn
from fused_rnn import timing

# float64 max error allowed against torch.nn: far above rounding, far below any real mistake
CHECK_TOL = 1e-8


def check_against_torch_nn(backend, device):
    """Max abs difference to torch.nn over outputs, h_n, c_n and all gradients: 2-layer
    bidirectional LSTM/GRU/RNN on an unsorted packed batch, float64."""
    worst = 0.0
    for mode in timing.MODES:
        ref = timing.make_layer(mode, "nn", 5, 6, 2, True, device, torch.float64)
        ours = timing.make_layer(mode, backend, 5, 6, 2, True, device, torch.float64)
        seqs = [torch.randn(n, 5, device=device, dtype=torch.float64, requires_grad=True) for n in (4, 7, 2)]
        results = []
        for m in (ref, ours):
            y, h = m(torch.nn.utils.rnn.pack_sequence(seqs, enforce_sorted=False))
            outs = [y.data] + (list(h) if isinstance(h, tuple) else [h])
            loss = sum((o * torch.linspace(-1, 1, o.numel(), device=device, dtype=o.dtype).view_as(o)).sum()
                       for o in outs)
            results.append(outs + list(torch.autograd.grad(loss, seqs + list(m.parameters()))))
        worst = max([worst] + [(a - b).abs().max().item() for a, b in zip(*results)])
    return worst


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fused_rnn", description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--T", type=int, default=50)
    p.add_argument("--B", type=int, default=16)
    p.add_argument("--H", type=int, default=128)
    p.add_argument("--repeats", type=int, default=9)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    warnings.filterwarnings("ignore", message="fused_rnn: auto uses")

    print(f"fused_rnn {fused_rnn.__version__} | torch {torch.__version__} | python {platform.python_version()} | "
          f"{platform.machine()} | device {device} | {torch.get_num_threads()} CPU threads")
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(device)} | CUDA {torch.version.cuda} | "
              f"cuDNN {torch.backends.cudnn.version()}")
    from fused_rnn.ops.cpp import ops  # noqa: PLC0415
    if ops.load_error() is None:
        from fused_rnn import _C  # noqa: PLC0415
        print(f"CPU kernels built for: {_C.cpu_isa()} (the widest this CPU runs; FUSED_RNN_CPU_ISA caps it)")

    print("\nBackends on", device.type)
    status = fused_rnn.available_backends(device)
    for name, s in status.items():
        print(f"  {name:10s} {'yes' if s.available else 'no ':3s}  {'' if s.available else s.reason}")
    usable = [n for n, s in status.items() if s.available]

    print("\nCheck against torch.nn (float64; 2-layer bidirectional LSTM, GRU, RNN on a packed batch;"
          " outputs, states and every gradient)")
    failed = []
    for name in usable:
        err = check_against_torch_nn(name, device)
        ok = err <= CHECK_TOL
        failed += [] if ok else [name]
        print(f"  {name:10s} max |diff| {err:.2e}  {'ok' if ok else 'FAILED'}")

    T, B, H = args.T, args.B, args.H
    print(f"\nSpeed: single-layer LSTM and GRU, T={T} B={B} I=H={H} float32, median of {args.repeats} runs, "
          "each backend's runs interleaved with torch.nn's (ratio = torch.nn time / backend time)")
    if device.type == "cpu" and hasattr(os, "getloadavg"):
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
        busy = "  -- the machine is busy: the times are not the kernels' alone" if load > 0.5 * cores else ""
        print(f"  load average {load:.1f} on {cores} cores{busy}")
    names = ["nn"] + [n for n in usable if n != "reference"]
    print(f"  {'layer':5s} {'backend':10s} {'no-grad ms':>11s} {'ratio':>6s} {'fwd+bwd ms':>11s} {'ratio':>6s}")
    for mode in ("LSTM", "GRU"):
        layers = {name: timing.make_layer(mode, name, H, H, device=device) for name in names}
        times = {what: timing.time_layers_interleaved(layers, what, T, B, H, device, repeats=args.repeats)
                 for what in ("inference", "forward+backward")}
        for name in names:
            row = [f"{times[w][name] * 1e3:11.2f} {times[w]['nn'] / times[w][name]:6.2f}" for w in times]
            print(f"  {mode:5s} {('torch.nn' if name == 'nn' else name):10s} " + " ".join(row))
    if failed:
        raise SystemExit(f"backends that disagree with torch.nn: {', '.join(failed)}")


if __name__ == "__main__":
    main()
