"""Drop-in options shared by the zoneout and layer-norm tests: one module on the torch backend
against the same module on the reference backend, in training, with the same seed."""
import torch
from torch.nn.utils.rnn import pack_padded_sequence

from helpers import assert_close, grads_of

OPTIONS = {
    "batch_first-2layers-dropout": dict(num_layers=2, dropout=0.3, batch_first=True),
    "bidirectional-packed": dict(bidirectional=True, packed=True),
    "unbatched": dict(unbatched=True),
}


def assert_torch_backend_matches_reference(make, option_kwargs, perturb=0.0):
    """make(backend, **kwargs) -> a float64 module; every output and parameter gradient agree."""
    kwargs = dict(option_kwargs)
    packed, unbatched = kwargs.pop("packed", False), kwargs.pop("unbatched", False)
    ours, ref = make("torch", **kwargs), make("reference", **kwargs)
    with torch.no_grad():  # away from initial values (layer-norm gains 1, biases 0)
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * perturb)
    ref.load_state_dict(ours.state_dict())
    shape = (5, 3) if unbatched else (4, 5, 3) if kwargs.get("batch_first") else (5, 4, 3)
    x = torch.randn(*shape, dtype=torch.float64)
    results = []
    for m in (ours, ref):
        inp = pack_padded_sequence(x, [5, 2, 4, 1], enforce_sorted=False) if packed else x
        torch.manual_seed(3)  # the same dropout and zoneout masks
        out, hidden = m(inp)
        outs = [out.data if packed else out] + list(hidden if isinstance(hidden, tuple) else (hidden,))
        results.append(outs + list(grads_of(outs, list(m.parameters()))))
    for a, b in zip(*results):
        assert_close(a, b, torch.float64)
