"""Prefix-tree forward for preference training: a batch of one agent's examples runs as a tree instead of
as flat (prompt + completion) rows. The shared system-and-tools prefix is computed once per batch, each
distinct prompt's history once, and every completion scored under it (chosen, rejected, KTO's KL
completion) as a branch that attends to its ancestors' keys and values.

Two forward calls per batch. Level 0 runs the shared prefix (1 row) and keeps its keys/values in a cache,
with gradient. Level 1 runs one row per distinct prompt: history, then each branch, laid out side by side
with a 4D mask (history causal; a branch sees the history and itself, never its sibling) and position ids
that restart at the end of the history for every branch, so each branch sees exactly the positions it
would see in a flat row. Logits are computed only at the positions that predict completion tokens."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import torch


@dataclass(frozen=True)
class TreeExample:
    """One prompt and the completions scored under it, as token ids (same split as TRL's tokenizer)."""

    prompt_ids: Sequence[int]
    completions: Sequence[Sequence[int]]


@dataclass
class TreeBatch:
    """Tensors for the two forward levels and the gather that turns hidden states into branch log-probs."""

    prefix_ids: torch.Tensor  # (1, P)
    row_ids: torch.Tensor  # (N, T): history + branches per distinct prompt, right-padded
    row_positions: torch.Tensor  # (N, T)
    row_mask: torch.Tensor  # (N, 1, T, P + T) bool, True = may attend
    score_rows: torch.Tensor  # (M,) row of the hidden state that predicts each completion token
    score_cols: torch.Tensor  # (M,) column of that hidden state
    score_labels: torch.Tensor  # (M,) the completion token
    score_branch: torch.Tensor  # (M,) flat index example * max_branches + branch
    branch_lengths: torch.Tensor  # (n_examples, max_branches) completion tokens per branch
    n_examples: int
    max_branches: int
    groups: list[list[int]]  # rows run together in one level-1 call, padded to the group's longest

    @property
    def tree_tokens(self) -> int:
        """Tokens the tree actually runs (prefix plus unpadded rows)."""
        return int(self.prefix_ids.shape[1]) + int((self.row_positions >= 0).sum())


def flat_tokens(examples: Sequence[TreeExample]) -> int:
    """Tokens a flat trainer runs for the same examples: the prompt again for every completion."""
    return sum(len(ex.prompt_ids) * len(ex.completions) + sum(len(c) for c in ex.completions) for ex in examples)


def common_prefix(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix all sequences share."""
    first = sequences[0]
    n = min(len(s) for s in sequences)
    for i in range(n):
        token = first[i]
        if any(s[i] != token for s in sequences):
            return i
    return n


# Rough cost of one more level-1 call, in padded tokens; a split must save more than this.
GROUP_OVERHEAD_TOKENS = 48


def group_rows(lengths: Sequence[int], max_groups: int = 3) -> list[list[int]]:
    """Rows sorted by length and cut into at most `max_groups` runs so padding (each run is padded to its
    longest row) plus the per-call overhead is smallest. Histories vary a lot in length; padding them all
    to the longest would waste a tenth of level 1."""
    order = sorted(range(len(lengths)), key=lambda r: -lengths[r])
    n = len(order)
    best = (n * lengths[order[0]], [order])
    for cuts in _cut_points(n, max_groups - 1):
        bounds = [0, *cuts, n]
        runs = [order[a:b] for a, b in pairwise(bounds)]
        cost = sum(len(run) * lengths[run[0]] for run in runs) + GROUP_OVERHEAD_TOKENS * (len(runs) - 1)
        if cost < best[0]:
            best = (cost, runs)
    return best[1]


def _cut_points(n: int, most: int) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = []
    for a in range(1, n):
        out.append((a,))
        if most > 1:
            out.extend((a, b) for b in range(a + 1, n))
    return out


def build_tree(examples: Sequence[TreeExample]) -> TreeBatch:
    """Lay out a batch as prefix + one row per distinct prompt (history, then its branches)."""
    if not examples:
        raise ValueError("empty batch")
    if any(len(ex.prompt_ids) == 0 for ex in examples):
        raise ValueError("every example needs a non-empty prompt")
    # Examples sharing a prompt (KTO rows unpaired from one pair, say) share one row of the tree.
    rows: dict[tuple[int, ...], list[tuple[int, int, Sequence[int]]]] = {}
    for e, ex in enumerate(examples):
        for b, completion in enumerate(ex.completions):
            rows.setdefault(tuple(ex.prompt_ids), []).append((e, b, completion))
        rows.setdefault(tuple(ex.prompt_ids), [])
    prompts = list(rows)
    # Keep one history token per row: the first completion token is predicted from the last prompt token,
    # which must sit in level 1 where the branches are.
    p = min(common_prefix(prompts), min(len(x) for x in prompts) - 1)
    max_branches = max(len(ex.completions) for ex in examples)

    row_tokens, row_pos, row_seg = [], [], []
    s_rows, s_cols, s_labels, s_branch = [], [], [], []
    lengths = torch.zeros(len(examples), max_branches, dtype=torch.long)
    for r, prompt in enumerate(prompts):
        history = list(prompt[p:])
        h = len(history)
        tokens, pos, seg = list(history), list(range(p, p + h)), [0] * h
        for k, (e, b, completion) in enumerate(rows[prompt], start=1):
            start = len(tokens)
            tokens.extend(completion)
            pos.extend(range(p + h, p + h + len(completion)))
            seg.extend([k] * len(completion))
            for j, token in enumerate(completion):
                s_rows.append(r)
                s_cols.append(h - 1 if j == 0 else start + j - 1)
                s_labels.append(token)
                s_branch.append(e * max_branches + b)
            lengths[e, b] = len(completion)
        row_tokens.append(tokens)
        row_pos.append(pos)
        row_seg.append(seg)

    t = max(len(x) for x in row_tokens)
    n = len(prompts)
    ids = torch.zeros(n, t, dtype=torch.long)
    positions = torch.full((n, t), -1, dtype=torch.long)
    seg = torch.full((n, t), -1, dtype=torch.long)
    for r in range(n):
        ids[r, : len(row_tokens[r])] = torch.tensor(row_tokens[r])
        positions[r, : len(row_pos[r])] = torch.tensor(row_pos[r])
        seg[r, : len(row_seg[r])] = torch.tensor(row_seg[r])

    q = torch.arange(t).view(1, t, 1)
    k = torch.arange(t).view(1, 1, t)
    seg_q, seg_k = seg.unsqueeze(2), seg.unsqueeze(1)
    local = (k <= q) & (seg_k >= 0) & ((seg_k == 0) | (seg_k == seg_q))
    # Padding queries see only the prefix: a row with nothing to attend to would give NaN in backward.
    local &= (seg_q >= 0)
    mask = torch.cat([torch.ones(n, t, p, dtype=torch.bool), local], dim=2).unsqueeze(1)
    return TreeBatch(
        prefix_ids=torch.tensor([list(prompts[0][:p])], dtype=torch.long),
        row_ids=ids,
        row_positions=positions,
        row_mask=mask,
        score_rows=torch.tensor(s_rows, dtype=torch.long),
        score_cols=torch.tensor(s_cols, dtype=torch.long),
        score_labels=torch.tensor(s_labels, dtype=torch.long),
        score_branch=torch.tensor(s_branch, dtype=torch.long),
        branch_lengths=lengths,
        n_examples=len(examples),
        max_branches=max_branches,
        groups=group_rows([len(x) for x in row_tokens]),
    )


def decoder_and_head(model: Any) -> tuple[Any, Any]:
    """The transformer body (no LM head) and the LM head of a causal LM, PEFT-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def cache_kwargs(module: Any, cache: Any) -> dict:
    """The keyword a model's forward takes its KV cache by: transformers renamed `past_key_values` to
    `cache`; accept both so a minor upgrade does not break us."""
    import inspect

    name = "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"
    return {name: cache}


def repeat_cache(prefix: Any, rows: int, config: Any) -> Any:
    """A cache holding `prefix`'s keys/values once per row, as expanded views: the gradient of every row
    flows back into the one prefix pass (training), and generation appends to it like any cache (eval)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    for i, layer in enumerate(prefix.layers):
        cache.update(layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1), i)
    return cache


def tree_hidden(model: Any, tree: TreeBatch) -> torch.Tensor:
    """Hidden states of level 1, (N, T, H); level 0's keys/values stay in the graph, so gradients reach them."""
    from transformers import DynamicCache

    decoder, _ = decoder_and_head(model)
    device = next(decoder.parameters()).device
    dtype = next(decoder.parameters()).dtype
    t = tree.row_ids.shape[1]
    p = tree.prefix_ids.shape[1]
    prefix = None
    if p > 0:
        prefix = DynamicCache(config=decoder.config)
        decoder(input_ids=tree.prefix_ids.to(device), position_ids=torch.arange(p, device=device).unsqueeze(0),
                use_cache=True, **cache_kwargs(decoder, prefix))
    outs = []
    for rows in tree.groups:
        index = torch.tensor(rows)
        width = int((tree.row_positions[index] >= 0).sum(dim=1).max())
        # Every row of the group reads the same prefix keys/values.
        cache = repeat_cache(prefix, len(rows), decoder.config) if prefix is not None else None
        allowed = tree.row_mask[index][:, :, :width, : p + width]
        # An additive float mask works with every attention implementation (eager adds it, sdpa takes it).
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
        out = decoder(input_ids=tree.row_ids[index, :width].to(device),
                      position_ids=tree.row_positions[index, :width].clamp(min=0).to(device),
                      attention_mask=mask.to(device), use_cache=cache is not None,
                      **cache_kwargs(decoder, cache)).last_hidden_state
        outs.append(torch.nn.functional.pad(out, (0, 0, 0, t - width)))
    order = torch.tensor([r for rows in tree.groups for r in rows])
    hidden = torch.cat(outs, dim=0)
    return hidden[torch.argsort(order).to(hidden.device)]


def token_logps(model: Any, tree: TreeBatch, hidden: torch.Tensor) -> torch.Tensor:
    """Log-prob of every completion token, (M,), from the LM head at the predicting positions only."""
    _, head = decoder_and_head(model)
    device = hidden.device
    picked = hidden[tree.score_rows.to(device), tree.score_cols.to(device)]
    logits = head(picked).float()
    labels = tree.score_labels.to(device).unsqueeze(1)
    # x - logsumexp(x), not log_softmax: fp32 log_softmax over a 49k vocabulary drifts ~5e-6 per token,
    # which over a 40-token completion is 2.6e-4 away from TRL's chunked log-probs; this form stays within 5e-5.
    return logits.gather(1, labels).squeeze(1) - torch.logsumexp(logits, dim=-1)


def branch_logps(model: Any, tree: TreeBatch) -> torch.Tensor:
    """Summed completion log-prob per (example, branch), (n_examples, max_branches); 0 where absent."""
    return tree_forward(model, tree)[0]


def tree_forward(model: Any, tree: TreeBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Branch log-prob sums and per-token log-probs in one pass (SFT wants the tokens, DPO the sums)."""
    per_token = token_logps(model, tree, tree_hidden(model, tree))
    sums = per_token.new_zeros(tree.n_examples * tree.max_branches)
    sums = sums.index_add(0, tree.score_branch.to(per_token.device), per_token)
    return sums.view(tree.n_examples, tree.max_branches), per_token
