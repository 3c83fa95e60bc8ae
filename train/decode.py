"""Greedy decoding with a KV cache, written out so every rank can run the same number of steps.

`model.generate` stops when *its* batch is done, so under FSDP (where every forward is a collective)
ranks with different batches would issue different numbers of forwards and hang. With `fixed_steps` each
rank runs exactly `max_new_tokens` decoder steps. Output matches `generate(do_sample=False, num_beams=1)`
(tests/test_train_units.py checks that).
"""

from __future__ import annotations

import inspect

import torch


def cache_kwarg(model) -> str:
    """The name of the KV-cache argument (and output field) of `model.forward`: transformers renamed
    `past_key_values` to `cache` within 5.x (5.17, the GPU image's, has the old name; 5.24 the new),
    and `transformers>=5.0` admits both, so ask the model rather than assume one (measured: the first
    GPU speedrun died at its first validation on `out.cache`, 2026-11-27)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def greedy_decode(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    fixed_steps: bool = False,
) -> torch.Tensor:
    """Token ids [batch, <= max_new_tokens]; after a row's eos, the row holds pad ids."""
    from transformers.modeling_outputs import BaseModelOutput

    cfg = model.config
    start, eos, pad = cfg.decoder_start_token_id, cfg.eos_token_id, cfg.pad_token_id
    b, cache = input_ids.size(0), cache_kwarg(model)
    dec = torch.full((b, 1), start, dtype=torch.long, device=input_ids.device)
    out = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=dec, use_cache=True)
    enc = BaseModelOutput(last_hidden_state=out.encoder_last_hidden_state)
    done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
    tokens = []
    for step in range(max_new_tokens):
        nxt = out.logits[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        tokens.append(nxt)
        done |= nxt == eos
        if step == max_new_tokens - 1 or (done.all() and not fixed_steps):
            break
        out = model(
            encoder_outputs=enc, attention_mask=attention_mask, decoder_input_ids=nxt[:, None],
            use_cache=True, **{cache: getattr(out, cache)},
        )
    return torch.stack(tokens, 1)
