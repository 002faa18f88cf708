"""Small shared pieces for the tests: tiny random models and running a text through a cache."""

import tokenizers
import torch

import model
import simulate


def randomize(hf_model, seed=0):
    """Every parameter of a transformers model random, norms and biases included: a loader that
    drops one cannot pass."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hf_model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return hf_model.eval()


def byte_bpe(corpus, specials) -> tokenizers.Tokenizer:
    """A byte-level BPE (GPT-2 style, 300 tokens) trained on corpus, with these special tokens."""
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    bpe.train_from_iterator(corpus, tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    return bpe


def tiny_model(name="tiny-llama", seed=0, dtype=torch.float32, **overrides):
    """A tiny random model with non-trivial weights everywhere (norms and biases too)."""
    torch.manual_seed(seed)
    m = model.Transformer(model.preset(name, **overrides)).eval()
    for p in m.parameters():
        p.data.normal_(0.0, 0.3)
    return m.to(dtype)


def run_through(m, tokens, cache, prompt_len=None):
    """Feed tokens (B, T) in the calls the masked simulation also makes; -> logits (B, T, V)."""
    bounds = simulate.call_bounds(tokens.shape[1], cache.mode, cache.chunk, prompt_len)
    with torch.no_grad():
        return torch.cat([m(tokens[:, s:e], cache) for s, e in bounds], dim=1)


def report_after(request, lines):
    """Write `lines` (a list of strings) to the terminal once a module's tests are done, past pytest's capture."""
    plugins = request.config.pluginmanager
    reporter, capture = plugins.getplugin("terminalreporter"), plugins.getplugin("capturemanager")
    if reporter and capture and lines:
        with capture.global_and_fixture_disabled():
            for line in lines:
                reporter.write_line(line)
