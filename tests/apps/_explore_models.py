"""Tiny untrained models saved with the apps' own save functions, for the explorer's tests.

Untrained weights are enough: the explorer shows whatever the model attends to, and the tests
check the plumbing (shapes, validation, messages), not what the model learned.
"""

import contextlib
import string

import torch

from attnkit.apps.explore.model_view import Models
from attnkit.apps.explore.server import make_server, serve_in_thread
from attnkit.apps.gpt.model import GPT, GPTConfig, save_checkpoint
from attnkit.apps.translate.train import SOURCE_VOCAB, TARGET_VOCAB, save_translator
from attnkit.apps.translate.model import TransformerConfig, TransformerSeq2Seq

#: chromium resolves this name to 127.0.0.1 (``--host-resolver-rules`` in conftest's driver):
#: a page on "another site" that DNS-rebinds to the explorer, for the Host check's browser test.
REBIND_HOST = "rebind.attacker.test"
GPT_CHARS = list(string.ascii_letters + string.digits + " .,;:()'\n")
GPT_CONTEXT = 256  # long enough to check the head view at 200+ tokens


def save_tiny_models(root):
    """Save a tiny translator to ``root/translate`` and a tiny GPT to ``root/gpt/gpt.pt``.

    Returns:
        ``(translator_dir, gpt_path)``.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        translator = TransformerSeq2Seq(TransformerConfig(
            len(SOURCE_VOCAB), len(TARGET_VOCAB), embed_dim=32, num_heads=2,
            num_encoder_layers=1, num_decoder_layers=2, ff_dim=64)).eval()
        gpt = GPT(GPTConfig.preset("tiny", len(GPT_CHARS), max_seq_len=GPT_CONTEXT)).eval()
    translator_dir = root / "translate"
    save_translator(translator, translator_dir)
    gpt_path = save_checkpoint(root / "gpt" / "gpt.pt", gpt, chars=GPT_CHARS)
    return translator_dir, gpt_path


@contextlib.contextmanager
def running_server(root):
    """The explorer's server on an ephemeral 127.0.0.1 port, serving tiny models saved in
    ``root``; shut down on exit."""
    translator_dir, gpt_path = save_tiny_models(root)
    srv = make_server(0, models=Models(translator_dir, gpt_path))
    serve_in_thread(srv)
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
