"""PyTorch's word_language_model example (examples/word_language_model: model.py and main.py),
written once for nn.LSTM, run with the class swapped for FastMLSTM and nothing else changed:
positional num_layers, dropout between layers, the hidden state repackaged between batches, manual
SGD on ``p.data``, gradient clipping, ``flatten_parameters()``, saving the whole model and loading
it back, and a state_dict round trip."""

import gzip
import math
import re
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from conftest import DATA_DIR
from torch import nn

from fastmlstm import FastMLSTM


class RNNModel(nn.Module):
    """Container module with an encoder, a recurrent module, and a decoder (the example's model.py)."""

    def __init__(self, rnn_class, ntoken, ninp, nhid, nlayers, dropout=0.5):
        super().__init__()
        self.ntoken = ntoken
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = rnn_class(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        self.nhid, self.nlayers = nhid, nlayers
        initrange = 0.1
        nn.init.uniform_(self.encoder.weight, -initrange, initrange)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -initrange, initrange)

    def forward(self, input, hidden):
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        output = self.drop(output)
        decoded = self.decoder(output).view(-1, self.ntoken)
        return F.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, bsz):
        weight = next(self.parameters())
        return (weight.new_zeros(self.nlayers, bsz, self.nhid), weight.new_zeros(self.nlayers, bsz, self.nhid))


def repackage_hidden(h):
    """Wraps hidden states in new Tensors, to detach them from their history."""
    if isinstance(h, torch.Tensor):
        return h.detach()
    return tuple(repackage_hidden(v) for v in h)


def batchify(data, bsz):
    nbatch = data.size(0) // bsz
    return data.narrow(0, 0, nbatch * bsz).view(bsz, -1).t().contiguous()


def get_batch(source, i, bptt):
    seq_len = min(bptt, len(source) - 1 - i)
    return source[i:i + seq_len], source[i + 1:i + 1 + seq_len].reshape(-1)


def evaluate(model, data_source, bptt, bsz):
    model.eval()
    total_loss, hidden = 0.0, model.init_hidden(bsz)
    with torch.no_grad():
        for i in range(0, data_source.size(0) - 1, bptt):
            data, targets = get_batch(data_source, i, bptt)
            output, hidden = model(data, hidden)
            hidden = repackage_hidden(hidden)
            total_loss += len(data) * F.nll_loss(output, targets).item()
    return total_loss / (len(data_source) - 1)


def train_epoch(model, train_data, bptt, bsz, lr, clip):
    model.train()
    hidden = model.init_hidden(bsz)
    for i in range(0, train_data.size(0) - 1, bptt):
        data, targets = get_batch(train_data, i, bptt)
        hidden = repackage_hidden(hidden)
        model.zero_grad()
        output, hidden = model(data, hidden)
        loss = F.nll_loss(output, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-lr)


def _corpus(n_words=12000, vocab=400):
    """Word ids of real review text (IMDB's unlabelled reviews) or, without the data, of a small
    synthetic grammar; rare words map to <unk> as in the example's data."""
    path = DATA_DIR / "imdb" / "unsup.txt.gz"
    if path.exists():
        with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
            words = []
            for line in f:
                words += re.findall(r"[a-z']+|[.,!?]", line.lower()) + ["<eos>"]
                if len(words) >= n_words:
                    break
    else:
        g = torch.Generator().manual_seed(0)
        base = "the movie was good and the plot was bad but the actors were great <eos>".split()
        words = [base[int(i)] for i in torch.randint(0, len(base), (n_words,), generator=g)]
    common = {w for w, _ in Counter(words).most_common(vocab - 1)}
    index = {w: i for i, w in enumerate(sorted(common | {"<unk>"}))}
    return torch.tensor([index.get(w, index["<unk>"]) for w in words[:n_words]]), len(index)


@pytest.mark.parametrize("rnn_class", [nn.LSTM, FastMLSTM], ids=["nn.LSTM", "FastMLSTM"])
def test_the_example_trains_with_either_class(rnn_class, tmp_path):
    torch.manual_seed(0)
    ids, ntokens = _corpus()
    split = int(len(ids) * 0.9)
    bsz, bptt = 10, 20
    train_data, val_data = batchify(ids[:split], bsz), batchify(ids[split:], bsz)
    model = RNNModel(rnn_class, ntokens, 32, 48, 2, dropout=0.2)
    before = evaluate(model, val_data, bptt, bsz)
    assert math.isclose(before, math.log(ntokens), rel_tol=0.05)  # an untrained model is uniform-ish
    for _ in range(2):
        train_epoch(model, train_data, bptt, bsz, lr=20.0, clip=0.25)
    after = evaluate(model, val_data, bptt, bsz)
    assert after < before - 0.8, (before, after)

    # Saving and loading as the example's main.py does: the whole model, then flatten_parameters.
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    loaded.rnn.flatten_parameters()
    assert evaluate(loaded, val_data, bptt, bsz) == after
    # And through a state dict into a freshly built model.
    fresh = RNNModel(rnn_class, ntokens, 32, 48, 2, dropout=0.2)
    fresh.load_state_dict(model.state_dict())
    assert evaluate(fresh, val_data, bptt, bsz) == after
