"""Slow, obviously-correct loop twins of grpokit.algo, transcribing SPEC.md line by line.

Python floats (float64) and explicit loops; no vectorisation beyond what a line of the SPEC says.
Inputs are torch tensors (converted with .tolist()); outputs are float64 tensors of the same shape
(bool tensors for stats). Only the equivalence tests use these.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch

CLAMP = 20.0  # SPEC section 0: clamp ℓ − ℓ° to [−20, 20] before exp
EPS = 1e-6  # SPEC section 1


def _clamp(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


def _groups(group_ids: list[int]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(group_ids):
        groups[g].append(i)
    return groups


# ---------------------------------------------------------------- section 1: advantages


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _std(xs: list[float], unbiased: bool) -> float:
    if len(xs) < 2:
        return 0.0
    mu = _mean(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1 if unbiased else len(xs)))


def _flat(xs: list[float]) -> bool:
    """All equal (a singleton is flat): the SPEC's A = 0 exactly."""
    return all(x == xs[0] for x in xs)


def advantages(name: str, rewards: torch.Tensor, group_ids: torch.Tensor, *, eps: float = EPS,
               std: str = "unbiased") -> torch.Tensor:
    r, g = rewards.tolist(), group_ids.tolist()
    unbiased = std == "unbiased"
    out = [0.0] * len(r)
    batch_sd = _std(r, unbiased) if r else 0.0
    for members in _groups(g).values():
        rs = [r[i] for i in members]
        if _flat(rs):
            continue  # A = 0 exactly (flat or singleton group)
        mu, sd, n = _mean(rs), _std(rs, unbiased), len(rs)
        for i in members:
            if name == "grpo":
                out[i] = (r[i] - mu) / (sd + eps)
            elif name == "dr_grpo":
                out[i] = r[i] - mu
            elif name == "batch_std":
                out[i] = (r[i] - mu) / (batch_sd + eps)
            elif name == "rloo":  # R_i − mean of the others
                out[i] = r[i] - sum(r[j] for j in members if j != i) / (n - 1)
            else:
                raise KeyError(name)
    return torch.tensor(out, dtype=torch.float64)


# ---------------------------------------------------------------- section 2: losses


def _dual_clip_ppo(rho: float, a: float, cl: float, ch: float, c: float | None) -> float:
    loss = max(-a * rho, -a * _clamp(rho, 1 - cl, 1 + ch))
    if c is not None and a < 0:
        loss = min(loss, -a * c)
    return loss


def ppo_clip(logp, old_logp, adv, mask, *, clip_low, clip_high, dual_clip_c=None):
    """Returns (per_tok, clipped_low, clipped_high, dual_clipped)."""
    lp, op, ad, m = logp.tolist(), old_logp.tolist(), adv.tolist(), mask.tolist()
    b, t = mask.shape
    out = torch.zeros(b, t, dtype=torch.float64)
    lo, hi, du = (torch.zeros(b, t, dtype=torch.bool) for _ in range(3))
    for i in range(b):
        for j in range(t):
            if not m[i][j]:
                continue
            rho = math.exp(_clamp(lp[i][j] - op[i][j], -CLAMP, CLAMP))
            a = ad[i][j]
            out[i, j] = _dual_clip_ppo(rho, a, clip_low, clip_high, dual_clip_c)
            lo[i, j] = a < 0 and rho < 1 - clip_low
            hi[i, j] = a > 0 and rho > 1 + clip_high
            du[i, j] = dual_clip_c is not None and a < 0 and rho > dual_clip_c
    return out, lo, hi, du


def gspo(logp, old_logp, adv, mask, *, clip_low, clip_high, dual_clip_c=None):
    """Per-token value: the sequence ratio s_i in place of ρ (the token form has value s_i)."""
    lp, op, ad, m = logp.tolist(), old_logp.tolist(), adv.tolist(), mask.tolist()
    b, t = mask.shape
    out = torch.zeros(b, t, dtype=torch.float64)
    for i in range(b):
        n = sum(m[i])
        if n == 0:
            continue
        log_s = sum(lp[i][j] - op[i][j] for j in range(t) if m[i][j]) / n
        s = math.exp(_clamp(log_s, -CLAMP, CLAMP))
        for j in range(t):
            if m[i][j]:
                out[i, j] = _dual_clip_ppo(s, ad[i][j], clip_low, clip_high, dual_clip_c)
    return out


def cispo(logp, old_logp, adv, mask, *, clip_low, clip_high):
    lp, op, ad, m = logp.tolist(), old_logp.tolist(), adv.tolist(), mask.tolist()
    b, t = mask.shape
    out = torch.zeros(b, t, dtype=torch.float64)
    for i in range(b):
        for j in range(t):
            if m[i][j]:
                rho = math.exp(_clamp(lp[i][j] - op[i][j], -CLAMP, CLAMP))
                out[i, j] = -_clamp(rho, 1 - clip_low, 1 + clip_high) * ad[i][j] * lp[i][j]
    return out


# ---------------------------------------------------------------- section 3: aggregation


def aggregate(name: str, per_tok, mask, *, num_tokens, num_seqs, norm_const) -> float:
    x, m = per_tok.tolist(), mask.tolist()
    total = 0.0
    for i in range(len(x)):
        row = sum(x[i][j] for j in range(len(x[i])) if m[i][j])
        if name == "seq_mean_token_mean":
            row = row / sum(m[i]) if sum(m[i]) else 0.0
        total += row
    if name == "token_mean":
        return total / max(num_tokens, 1)
    if name in ("seq_mean_token_mean", "seq_mean_token_sum"):
        return total / max(num_seqs, 1)
    if name == "seq_mean_token_sum_norm":
        return total / (max(num_seqs, 1) * norm_const)
    raise KeyError(name)


# ---------------------------------------------------------------- section 4: KL


def kl(name: str, logp, ref_logp) -> torch.Tensor:
    lp, rp = logp.tolist(), ref_logp.tolist()
    out = torch.zeros(logp.shape, dtype=torch.float64)
    for i in range(len(lp)):
        for j in range(len(lp[i])):
            d = lp[i][j] - rp[i][j]
            if name == "k1":
                out[i, j] = d
            elif name == "k2":
                out[i, j] = 0.5 * d * d
            else:  # k3 = r − log r − 1, r = e^{−δ}
                d = _clamp(d, -CLAMP, CLAMP)
                out[i, j] = math.exp(-d) + d - 1
    return out


# ---------------------------------------------------------------- scan (sections 6, 7)


def reverse_scan_direct(x, gamma: float) -> torch.Tensor:
    """F[i,t] = Σ_{k=t..T} γ^(k−t) x[i,k], the definition (O(T²)); small T only."""
    out = []
    for row in x.tolist():
        out.append([sum(gamma ** (k - t) * row[k] for k in range(t, len(row))) for t in range(len(row))])
    return torch.tensor(out, dtype=torch.float64).reshape(x.shape)


def reverse_scan(x, gamma: float) -> torch.Tensor:
    """F_t = x_t + γ·F_{t+1}, the recursion, in Python floats (float64), row by row."""
    out = []
    for row in x.tolist():
        carry, col = 0.0, [0.0] * len(row)
        for t in range(len(row) - 1, -1, -1):
            carry = row[t] + gamma * carry
            col[t] = carry
        out.append(col)
    return torch.tensor(out, dtype=torch.float64).reshape(x.shape)


# ---------------------------------------------------------------- section 6: FIPO


def fipo(logp, old_logp, adv, mask, *, clip_low=0.2, clip_high=0.28, dual_clip_c=10.0, tau=32.0,
         f_low=1.0, f_high=1.2, safety=10.0, drop_seqs=True):
    """Returns dict: per_tok, weight, F, reset, dropped (float64 / bool tensors)."""
    lp, op, ad, m = logp.tolist(), old_logp.tolist(), adv.tolist(), mask.tolist()
    b, t = mask.shape
    gamma = 2.0 ** (-1.0 / tau) if tau > 0 else 0.0
    res = {k: [[0.0] * t for _ in range(b)] for k in ("per_tok", "weight", "F", "reset")}
    res["dropped"] = [False] * b
    for i in range(b):
        d = [_clamp(lp[i][j] - op[i][j], -CLAMP, CLAMP) if m[i][j] else 0.0 for j in range(t)]
        rho = [math.exp(x) for x in d]
        keep = [m[i][j] and (dual_clip_c is None or d[j] <= math.log(dual_clip_c)) for j in range(t)]
        fut = 0.0
        for j in range(t - 1, -1, -1):  # F_t = M_t·d_t + γ·F_{t+1}
            fut = (d[j] if keep[j] else 0.0) + gamma * fut
            if not m[i][j]:
                continue
            f = _clamp(math.exp(min(fut, 700.0)), f_low, f_high)
            reset = safety is not None and ad[i][j] < 0 and rho[j] > safety
            if reset:
                f = _clamp(f, 0.8, 1.0)
            res["F"][i][j] = fut
            res["weight"][i][j] = f
            res["reset"][i][j] = reset
            res["per_tok"][i][j] = f * _dual_clip_ppo(rho[j], ad[i][j], clip_low, clip_high, dual_clip_c)
        n_dual = sum(1 for j in range(t) if m[i][j] and ad[i][j] < 0 and dual_clip_c is not None
                     and rho[j] > dual_clip_c)
        if drop_seqs and n_dual > 1:
            res["dropped"][i] = True
            res["per_tok"][i] = [0.0] * t
    out = {k: torch.tensor(v, dtype=torch.float64).reshape(b, t) for k, v in res.items() if k != "dropped"}
    out["reset"] = out["reset"].bool()
    out["dropped"] = torch.tensor(res["dropped"], dtype=torch.bool).reshape(b)
    return out


# ---------------------------------------------------------------- section 7: FRPO


def frpo(seq_adv, mask, *, old_logp, ref_logp, beta, divergence="k1") -> torch.Tensor:
    a, m, op, rp = seq_adv.tolist(), mask.tolist(), old_logp.tolist(), ref_logp.tolist()
    b, t = mask.shape
    out = [[0.0] * t for _ in range(b)]
    for i in range(b):
        delta = [(op[i][j] - rp[i][j]) if m[i][j] else 0.0 for j in range(t)]  # k1, masked
        dc = [_clamp(x, -CLAMP, CLAMP) for x in delta]
        u = [math.exp(-x) for x in dc]  # π_ref/π_old
        if divergence == "k3":
            term = [u[j] - math.log(u[j]) - 1 if m[i][j] else 0.0 for j in range(t)]
        else:  # forward
            term = [u[j] * math.log(u[j]) - u[j] + 1 if m[i][j] else 0.0 for j in range(t)]
        s_incl = 0.0  # Σ_{j≥t} δ_j
        after = 0.0  # Σ_{j>t} f(u_j)
        for j in range(t - 1, -1, -1):
            s_incl += delta[j]
            if divergence == "k1":
                reg = s_incl
            elif divergence == "k3":
                reg = dc[j] + after
            else:
                reg = 1 - u[j] + after
            after += term[j]
            if m[i][j]:
                out[i][j] = a[i] - beta * reg
    return torch.tensor(out, dtype=torch.float64).reshape(b, t)


def implicit_utility(rewards, group_ids) -> float:
    groups = _groups(group_ids.tolist())
    r = rewards.tolist()
    vals = [2 * math.asin(math.sqrt(_mean([r[i] for i in mem]))) for mem in groups.values()]
    return _mean(vals)


# ---------------------------------------------------------------- section 8: cancellation


def cancellation_residual(response_ids, mask, group_ids, adv, weights) -> float:
    ids, m, a, w = response_ids.tolist(), mask.tolist(), adv.tolist(), weights.tolist()
    res = []
    for members in _groups(group_ids.tolist()).values():
        for t in range(len(ids[0]) if ids else 0):
            classes: dict[tuple, list[int]] = defaultdict(list)
            for i in members:
                if m[i][t]:
                    classes[tuple(ids[i][: t + 1])].append(i)
            for cls in classes.values():
                gross = sum(abs(a[i] * w[i]) for i in cls)
                if len(cls) >= 2 and gross > 0:
                    res.append(abs(sum(a[i] * w[i] for i in cls)) / gross)
    return _mean(res) if res else 0.0


def min_replace(w, group_ids) -> torch.Tensor:
    ws = w.tolist()
    out = [0.0] * len(ws)
    for members in _groups(group_ids.tolist()).values():
        lo = min(ws[i] for i in members)
        for i in members:
            out[i] = lo
    return torch.tensor(out, dtype=torch.float64)


def adv_orthogonal(w, adv, group_ids) -> torch.Tensor:
    ws, a = w.tolist(), adv.tolist()
    out = [0.0] * len(ws)
    for members in _groups(group_ids.tolist()).values():
        aa = sum(a[i] ** 2 for i in members)
        aw = sum(a[i] * ws[i] for i in members)
        wt = {i: ws[i] - (aw / aa if aa > 0 else 0.0) * a[i] for i in members}
        if min(wt.values()) <= 0:
            lo = min(ws[i] for i in members)
            wt = {i: lo for i in members}
        for i in members:
            out[i] = wt[i]
    return torch.tensor(out, dtype=torch.float64)


# ---------------------------------------------------------------- random test inputs


def make_batch(b: int, t: int, *, seed: int, dtype: torch.dtype = torch.float64, spread: float = 0.3,
               garbage: bool = True, n_groups: int = 3, all_masked: bool = False):
    """A random right-padded batch: ragged lengths (some rows empty), ragged non-contiguous groups,
    log-ratios with outliers, per-token advantages; NaN at padded positions when `garbage`.

    Returns dict: logp, old_logp, ref_logp, adv [B,T], seq_adv [B], mask [B,T], group_ids [B],
    rewards [B] (binary), ids [B,T] (token ids from a tiny vocabulary, with shared prefixes).
    `all_masked` makes every row empty.
    """
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, t + 1, (b,), generator=g)
    lengths[torch.rand(b, generator=g) < 0.15] = 0
    lengths[torch.rand(b, generator=g) < 0.3] = t
    if all_masked:
        lengths[:] = 0
    mask = torch.arange(t)[None, :] < lengths[:, None]
    old = -3.0 * torch.rand(b, t, generator=g, dtype=torch.float64)
    noise = spread * torch.randn(b, t, generator=g, dtype=torch.float64)
    noise = torch.where(torch.rand(b, t, generator=g) < 0.05, 8.0 * noise, noise)
    logp = old + noise
    ref = old + spread * torch.randn(b, t, generator=g, dtype=torch.float64)
    group_ids = torch.tensor([100, 7, 55, 3, 12][:n_groups])[torch.randint(0, n_groups, (b,), generator=g)]
    rewards = (torch.rand(b, generator=g) < 0.5).to(torch.float64)
    seq_adv = torch.randn(b, generator=g, dtype=torch.float64)
    adv = seq_adv[:, None].expand(b, t).clone()
    ids = torch.randint(0, 3, (b, t), generator=g)
    ids[:, : t // 3] = 1  # a shared template prefix
    out = dict(logp=logp, old_logp=old, ref_logp=ref, adv=adv)
    if garbage:
        out = {k: v.masked_fill(~mask, float("nan")) for k, v in out.items()}
    out = {k: v.to(dtype) for k, v in out.items()}
    out.update(mask=mask, group_ids=group_ids, rewards=rewards.to(dtype), seq_adv=seq_adv.to(dtype), ids=ids)
    return out


# ---------------------------------------------------------------- train step (issue 10): skipped rewards, optimizer
# steps per rollout, GSPO sequence weights (SPEC 8)


def advantages_valid(name: str, rewards, group_ids, valid, *, eps: float = EPS, std: str = "unbiased") -> torch.Tensor:
    """SPEC 1 computed over the valid rows alone (a skipped reward is no sample); skipped rows get 0."""
    r, g, v = rewards.tolist(), group_ids.tolist(), valid.tolist()
    keep = [i for i in range(len(r)) if v[i]]
    out = [0.0] * len(r)
    if keep:
        sub = advantages(name, torch.tensor([r[i] for i in keep], dtype=torch.float64),
                         torch.tensor([g[i] for i in keep]), eps=eps, std=std).tolist()
        for j, i in enumerate(keep):
            out[i] = sub[j]
    return torch.tensor(out, dtype=torch.float64)


def minibatch_sizes(B: int, k: int) -> list[int]:
    """k optimizer steps over B rows: sizes differ by at most one, the larger ones first."""
    return [B // k + (1 if j < B % k else 0) for j in range(k)]


def gspo_weighted(logp, old_logp, adv, mask, group_ids, seq_adv, *, clip_low, clip_high, transform: str):
    """GSPO (SPEC 2) with s_i replaced by its SPEC 8 transform over all the rows given (one optimizer step).

    Rows without a masked token take no part in a transform. Returns (per_tok [B,T], w [B], grad [B,T]):
    grad is d per_tok / d logp at each token: −A·w where the unclipped branch is the max, else 0.
    """
    lp, op, ad, m = logp.tolist(), old_logp.tolist(), adv.tolist(), mask.tolist()
    b, t = mask.shape
    s = [1.0] * b
    for i in range(b):
        n = sum(m[i])
        if n:
            s[i] = math.exp(_clamp(sum(lp[i][j] - op[i][j] for j in range(t) if m[i][j]) / n, -CLAMP, CLAMP))
    used = [i for i in range(b) if any(m[i])]
    w = list(s)
    if transform != "none" and used:
        ws = torch.tensor([s[i] for i in used], dtype=torch.float64)
        gs = torch.tensor([group_ids.tolist()[i] for i in used])
        if transform == "min_replace":
            sub = min_replace(ws, gs).tolist()
        else:
            sub = adv_orthogonal(ws, torch.tensor([seq_adv.tolist()[i] for i in used], dtype=torch.float64), gs).tolist()
        for j, i in enumerate(used):
            w[i] = sub[j]
    out = torch.zeros(b, t, dtype=torch.float64)
    grad = torch.zeros(b, t, dtype=torch.float64)
    for i in range(b):
        for j in range(t):
            if m[i][j]:
                a = ad[i][j]
                out[i, j] = _dual_clip_ppo(w[i], a, clip_low, clip_high, None)
                inside = (a > 0 and w[i] <= 1 + clip_high) or (a < 0 and w[i] >= 1 - clip_low)
                grad[i, j] = -a * w[i] if inside else 0.0
    return out, torch.tensor(w, dtype=torch.float64), grad

# ---------------------------------------------------------------------------- chunked log-softmax (scoring)

def selective_logprob_loop(hidden, weight, bias, targets, temperature):
    """Twin of `grpokit.rollout.logprobs.ChunkedLogprob`: one token at a time, its full row of logits in
    float64. Returns (logp [N], entropy [N]) float64, differentiable w.r.t. hidden, weight and bias."""
    logps, ents = [], []
    for n in range(hidden.shape[0]):
        z = hidden[n].double() @ weight.double().T  # [V]
        if bias is not None:
            z = z + bias.double()
        z = z / temperature  # [V]
        logp_all = z - torch.logsumexp(z, dim=0)  # [V]
        logps.append(logp_all[targets[n]])
        ents.append(-(logp_all.exp() * logp_all).sum())
    return torch.stack(logps), torch.stack(ents)


# ---------------------------------------------------------------- section 13: process-supervised credit (PRM)


def process_credit(step_rewards, step_ends, step_mask, group_ids, mask, *, eps: float = EPS,
                   std: str = "unbiased") -> torch.Tensor:
    """DeepSeekMath §4.1.3 / SPEC 13: r̃ = (r − mean_g)/(std_g + ε) over all steps of the group;
    A[i,t] = Σ_{steps j of i ending ≥ t} r̃_ij on real tokens. A group with < 2 steps or equal rewards: 0."""
    r, ends, sm = step_rewards.tolist(), step_ends.tolist(), step_mask.tolist()
    m, g = mask.tolist(), group_ids.tolist()
    b = len(m)
    t = len(m[0]) if b else 0
    norm = [[0.0] * len(r[i]) for i in range(b)]
    for members in _groups(g).values():
        steps = [(i, j) for i in members for j in range(len(r[i])) if sm[i][j]]
        vals = [r[i][j] for i, j in steps]
        if len(vals) < 2 or _flat(vals):
            continue
        mu, sd = _mean(vals), _std(vals, std == "unbiased")
        for i, j in steps:
            norm[i][j] = (r[i][j] - mu) / (sd + eps)
    out = [[0.0] * t for _ in range(b)]
    for i in range(b):
        for tt in range(t):
            if not m[i][tt]:
                continue
            out[i][tt] = sum(norm[i][j] for j in range(len(r[i])) if sm[i][j] and min(max(ends[i][j], 0), t - 1) >= tt)
    return torch.tensor(out, dtype=torch.float64).reshape(b, t)

# ---------------------------------------------------------------- section 10: weight-only quantized reference
# Element-by-element loops over rows and groups. The arithmetic is done on float32 / float16 scalar tensors,
# not Python floats, so that the codes match the vectorised quantizer bit for bit (a float64 division could
# round a code the other way at an exact tie); what the loops check is the grouping, padding and packing.

def quantize_int4_loop(weight: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """Group-wise asymmetric int4 of W [N, K]: per group of `group_size` inputs (K zero-padded),
    s = fp16((hi − lo) / 15) (1 if 0), m = fp16(lo), q = clamp(round((w − m) / s), 0, 15); byte j of a row
    holds code 2j in its low nibble and code 2j+1 in its high nibble."""
    n, k = weight.shape
    groups = -(-k // group_size)
    padded = groups * group_size
    qweight = torch.zeros(n, padded // 2, dtype=torch.uint8)
    scale = torch.zeros(n, groups, dtype=torch.float16)
    offset = torch.zeros(n, groups, dtype=torch.float16)
    for r in range(n):
        row = [weight[r, c].float() if c < k else torch.tensor(0.0) for c in range(padded)]
        codes = []
        for g in range(groups):
            vals = row[g * group_size:(g + 1) * group_size]
            lo, hi = min(vals), max(vals)
            s = ((hi - lo) / 15).half()
            s = s if s > 0 else torch.tensor(1.0, dtype=torch.float16)
            m = lo.half()
            scale[r, g], offset[r, g] = s, m
            for v in vals:
                codes.append(int(min(max(torch.round((v - m.float()) / s.float()).item(), 0), 15)))
        for j in range(padded // 2):
            qweight[r, j] = codes[2 * j] + 16 * codes[2 * j + 1]
    return {"qweight": qweight, "scale": scale, "offset": offset}


# ---- section 11 (catalogue): KDRL, G-OPD
# docs/catalogue.md: KDRL (arXiv 2506.02208) and G-OPD / ExOPD (arXiv 2602.12125), token by token.


def kdrl_beta(step: int, *, beta_start: float, beta_end: float, steps: int) -> float:
    """β_s = β_start + (β_end − β_start)·clamp((s − 1)/(S − 1), 0, 1); S ≤ 1: β_start."""
    if steps <= 1:
        return beta_start
    return beta_start + (beta_end - beta_start) * _clamp((step - 1) / (steps - 1), 0.0, 1.0)


def kdrl_term(logp, teacher_logp, mask, correct, *, beta: float, only_failed: bool = True) -> torch.Tensor:
    """per_tok[i,t] = c_i · ½(ℓ − ℓ_T)² on real tokens, c_i = β if response i failed (or every row), else 0."""
    lp, tl, m, ok = logp.tolist(), teacher_logp.tolist(), mask.tolist(), correct.tolist()
    b = len(m)
    t = len(m[0]) if b else 0
    out = [[0.0] * t for _ in range(b)]
    for i in range(b):
        c = beta if (not ok[i] or not only_failed) else 0.0
        for tt in range(t):
            if m[i][tt]:
                out[i][tt] = c * 0.5 * (lp[i][tt] - tl[i][tt]) ** 2
    return torch.tensor(out, dtype=torch.float64).reshape(b, t)


def gopd_advantage(teacher_logp, old_logp, ref_logp, adv, mask, *, lam: float, outcome_weight: float) -> torch.Tensor:
    """A[i,t] = w·A_outcome[i,t] + λ(ℓ_T − ℓʳ) − (ℓ° − ℓʳ) on real tokens (the paper's first form), 0 elsewhere."""
    tl, ol, a, m = teacher_logp.tolist(), old_logp.tolist(), adv.tolist(), mask.tolist()
    rl = ref_logp.tolist() if ref_logp is not None else None
    b = len(m)
    t = len(m[0]) if b else 0
    out = [[0.0] * t for _ in range(b)]
    for i in range(b):
        for tt in range(t):
            if not m[i][tt]:
                continue
            r_ref = rl[i][tt] if rl is not None else 0.0  # λ = 1: ℓʳ cancels
            reward = lam * (tl[i][tt] - r_ref) - (ol[i][tt] - r_ref)
            out[i][tt] = outcome_weight * a[i][tt] + reward
    return torch.tensor(out, dtype=torch.float64).reshape(b, t)


# ---- section 11 (catalogue): ACE, GRPO-lambda, DOT, DLER, APO, RAPO
# Each transcribes docs/catalogue.md line by line with Python floats; ties and edge cases are spelled out.


def _softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def ace(seq_adv, mask, old_logp, ref_logp, *, alpha: float) -> torch.Tensor:
    """A_i < 0: A_i·(1 + α·softplus(c_i)), c_i = Σ_t m(ℓ° − ℓʳ); A_i ≥ 0 unchanged."""
    a, m, lo, lr = seq_adv.tolist(), mask.tolist(), old_logp.tolist(), ref_logp.tolist()
    out = []
    for i in range(len(a)):
        c = sum(lo[i][t] - lr[i][t] for t in range(len(m[i])) if m[i][t])
        out.append(a[i] * (1.0 + alpha * _softplus(c)) if a[i] < 0 else a[i])
    return torch.tensor(out, dtype=torch.float64)


def apo_kl_weight(correct, valid, group_ids, *, beta: float, e: float) -> torch.Tensor:
    """β_i = β·(1 − exp(−e·(1 − d))) for correct (valid) rows, β otherwise; d = group accuracy over valid rows."""
    ok, v, g = correct.tolist(), valid.tolist(), group_ids.tolist()
    out = [beta] * len(ok)
    for members in _groups(g).values():
        n = sum(1 for i in members if v[i])
        d = sum(1 for i in members if v[i] and ok[i]) / n if n else 0.0
        for i in members:
            if v[i] and ok[i]:
                out[i] = beta * (1.0 - math.exp(-e * (1.0 - d)))
    return torch.tensor(out, dtype=torch.float64)


def grpo_lambda_penalty(lengths, correct, valid, group_ids, *, frac: float, alpha: float) -> torch.Tensor:
    """Top ⌈λ·S⌉ groups by accuracy (ties: smaller group id first); in them each correct row loses
    α·σ((L − mean_c)/std_c), mean/std (population) over the group's correct rows, z = 0 if std_c = 0."""
    L, ok, v, g = lengths.tolist(), correct.tolist(), valid.tolist(), group_ids.tolist()
    groups = _groups(g)
    acc = {}
    for gid, members in groups.items():
        n = sum(1 for i in members if v[i])
        acc[gid] = sum(1 for i in members if v[i] and ok[i]) / max(n, 1)
    ranked = sorted(groups, key=lambda gid: (-acc[gid], gid))
    k = min(max(math.ceil(frac * len(groups) - 1e-9), 1), len(groups)) if groups else 0
    out = [0.0] * len(L)
    for gid in ranked[:k]:
        good = [i for i in groups[gid] if v[i] and ok[i]]
        if not good:
            continue
        mu = sum(L[i] for i in good) / len(good)
        sd = math.sqrt(sum((L[i] - mu) ** 2 for i in good) / len(good))
        for i in good:
            z = (L[i] - mu) / sd if sd > 0 else 0.0
            out[i] = alpha / (1.0 + math.exp(-z))
    return torch.tensor(out, dtype=torch.float64)


def dot_cut_lengths(lengths, correct, valid, group_ids, *, std_mult: float, margin: int) -> torch.Tensor:
    """All-correct groups: T = floor(mean + k·std) (unbiased std, 0 for one member); L − T ≥ margin -> L = T."""
    L, ok, v, g = lengths.tolist(), correct.tolist(), valid.tolist(), group_ids.tolist()
    out = list(L)
    for members in _groups(g).values():
        if not all(v[i] and ok[i] for i in members):
            continue
        xs = [float(L[i]) for i in members]
        mu = sum(xs) / len(xs)
        sd = math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
        cut_at = math.floor(mu + std_mult * sd)
        for i in members:
            if L[i] - cut_at >= margin:
                out[i] = cut_at
    return torch.tensor(out, dtype=torch.long)


def truncation_penalized(lengths, truncated, *, cap: int) -> torch.Tensor:
    """Reward 0 when the row did not finish, or when cap > 0 and it is longer than cap."""
    return torch.tensor([bool(tr) or (cap > 0 and n > cap) for n, tr in zip(lengths.tolist(), truncated.tolist())])


def forward_kl(logp, ref_logp) -> torch.Tensor:
    """w·log w − w + 1 with w = π_ref/π_θ = exp(ℓʳ − ℓ), δ = ℓ − ℓʳ clamped to ±20 first."""
    lp, rp = logp.tolist(), ref_logp.tolist()
    out = torch.zeros(logp.shape, dtype=torch.float64)
    for i in range(len(lp)):
        for j in range(len(lp[i])):
            d = _clamp(lp[i][j] - rp[i][j], -CLAMP, CLAMP)
            w = math.exp(-d)
            out[i, j] = w * math.log(w) - w + 1.0
    return out
# ---- section 12: rollout correction
# d = ℓ° − μ per token; ratios are exp of d (or of its masked sum / mean) with the log clamped to ±20 (SPEC 0).
# Each twin returns (w, masked, truncated) [B, T]: w = 1, masked = truncated = False outside the mask.


def _corr_rows(log_ratio, mask):
    d, m = log_ratio.tolist(), mask.tolist()
    return d, m, len(d), (len(d[0]) if d else 0)


def rollout_correction(mode: str, log_ratio, mask, *, low=None, high=None):
    """SPEC 12's five decoupled modes, one row and one token at a time."""
    defaults = {"token_tis": (None, 2.0), "seq_tis": (None, 3.0), "token_mask": (None, 2.0),
                "seq_mask": (None, 3.0), "geo_mask": (0.99, 1.01)}[mode]
    lo = low if low is not None else defaults[0]
    hi = high if high is not None else defaults[1]
    if lo is None:
        lo = 1.0 / hi  # [1/C, C]
    d, m, b, t = _corr_rows(log_ratio, mask)
    w = [[1.0] * t for _ in range(b)]
    masked = [[False] * t for _ in range(b)]
    trunc = [[False] * t for _ in range(b)]
    for i in range(b):
        toks = [tt for tt in range(t) if m[i][tt]]
        if mode == "token_tis":  # w = min(exp(ℓ° − μ), C)
            for tt in toks:
                r = math.exp(_clamp(d[i][tt], -CLAMP, CLAMP))
                w[i][tt] = min(r, hi)
                trunc[i][tt] = r > hi
        elif mode == "seq_tis":  # w_i = min(exp(Σ_t m·(ℓ° − μ)), C) on every token of i
            r = math.exp(_clamp(sum(d[i][tt] for tt in toks), -CLAMP, CLAMP))
            for tt in toks:
                w[i][tt] = min(r, hi)
                trunc[i][tt] = r > hi
        elif mode == "token_mask":  # IcePop: keep the token iff exp(ℓ° − μ) ∈ [low, high]
            for tt in toks:
                r = math.exp(_clamp(d[i][tt], -CLAMP, CLAMP))
                keep = lo <= r <= hi
                w[i][tt] = 1.0 if keep else 0.0
                masked[i][tt] = not keep
        else:  # seq_mask: the sequence ratio; geo_mask: its geometric mean over the L_i tokens
            s = sum(d[i][tt] for tt in toks)
            if mode == "geo_mask":
                s = s / max(len(toks), 1)
            r = math.exp(_clamp(s, -CLAMP, CLAMP))
            keep = lo <= r <= hi
            for tt in toks:
                w[i][tt] = 1.0 if keep else 0.0
                masked[i][tt] = not keep
    return (torch.tensor(w, dtype=torch.float64).reshape(b, t), torch.tensor(masked).reshape(b, t),
            torch.tensor(trunc).reshape(b, t))


def corrected_loss(per_tok, w, mask, *, num_tokens: float) -> float:
    """token_mean of the weighted per-token loss: Σ_{i,t} m·w·loss / N_tok, N_tok counting masked tokens too."""
    p, ww, m = per_tok.tolist(), w.tolist(), mask.tolist()
    return sum(p[i][t] * ww[i][t] for i in range(len(p)) for t in range(len(p[i])) if m[i][t]) / max(num_tokens, 1.0)
# ---- section 11 (catalogue): Clip-Cov, KL-Cov, SAPO, DPPO


def _cov_lists(adv, logp, mask):
    """verl: cov = (A − mean A)·(ℓ − mean ℓ) over the valid tokens. Returns (cov [b][t], valid (i, j) row-major)."""
    ad, lp, m = adv.tolist(), logp.tolist(), mask.tolist()
    b, t = mask.shape
    valid = [(i, j) for i in range(b) for j in range(t) if m[i][j]]
    cov = [[0.0] * t for _ in range(b)]
    if not valid:
        return cov, valid
    mean_a = sum(ad[i][j] for i, j in valid) / len(valid)
    mean_l = sum(lp[i][j] for i, j in valid) / len(valid)
    for i, j in valid:
        cov[i][j] = (ad[i][j] - mean_a) * (lp[i][j] - mean_l)
    return cov, valid


def clip_cov_select(adv, logp, mask, clipped, *, ratio, cov_lb, cov_ub, generator):
    """verl compute_policy_loss_clip_cov: candidates = valid, not clipped, cov_lb < cov < cov_ub (row-major,
    as torch.nonzero); clip_num = max(int(ratio·N), 1); perm = randperm(#candidates)[:clip_num]."""
    cov, valid = _cov_lists(adv, logp, mask)
    cl = clipped.tolist()
    cands = [(i, j) for i, j in valid if not cl[i][j] and cov_lb < cov[i][j] < cov_ub]
    clip_num = max(int(ratio * len(valid)), 1)
    out = torch.zeros(mask.shape, dtype=torch.bool)
    if cands:
        perm = torch.randperm(len(cands), generator=generator).tolist()
        for p in perm[: min(clip_num, len(cands))]:
            out[cands[p]] = True
    return out


def kl_cov_select(adv, logp, mask, *, ratio):
    """verl compute_policy_loss_kl_cov: the max(1, int(N·ratio)) valid tokens of largest cov (ties: earlier first)."""
    cov, valid = _cov_lists(adv, logp, mask)
    out = torch.zeros(mask.shape, dtype=torch.bool)
    if not valid:
        return out
    k = max(1, int(len(valid) * ratio))
    order = sorted(range(len(valid)), key=lambda n: (-cov[valid[n][0]][valid[n][1]], n))
    for n in order[:k]:
        out[valid[n]] = True
    return out


def clip_cov(logp, old_logp, adv, mask, *, clip_low, clip_high, dual_clip_c=None, ratio, cov_lb, cov_ub, generator):
    """PPO clip (section 2) with Clip-Cov: the chosen tokens' loss × 0 (verl's corr). Returns (per_tok, chosen)."""
    per_tok, lo, hi, du = ppo_clip(logp, old_logp, adv, mask, clip_low=clip_low, clip_high=clip_high, dual_clip_c=dual_clip_c)
    chosen = clip_cov_select(adv, logp, mask, lo | hi | du, ratio=ratio, cov_lb=cov_lb, cov_ub=cov_ub, generator=generator)
    b, t = mask.shape
    for i in range(b):
        for j in range(t):
            if chosen[i, j]:
                per_tok[i, j] = 0.0
    return per_tok, chosen


def kl_cov(logp, old_logp, adv, mask, *, kl_cov_ratio, kl_cov_coef, penalised=None):
    """−A·ρ on every valid token, + coef·|ℓ − ℓ°| on the selected ones. Returns (per_tok, penalised)."""
    if penalised is None:
        penalised = kl_cov_select(adv, logp, mask, ratio=kl_cov_ratio)
    lp, op, ad, m, pen = logp.tolist(), old_logp.tolist(), adv.tolist(), mask.tolist(), penalised.tolist()
    b, t = mask.shape
    out = torch.zeros(b, t, dtype=torch.float64)
    for i in range(b):
        for j in range(t):
            if m[i][j]:
                d = _clamp(lp[i][j] - op[i][j], -CLAMP, CLAMP)
                out[i, j] = -ad[i][j] * math.exp(d) + (kl_cov_coef * abs(d) if pen[i][j] else 0.0)
    return out, penalised


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def sapo(logp, old_logp, adv, mask, *, tau_pos, tau_neg):
    """TRL loss_type='sapo': −A·σ(τ(ρ − 1))·4/τ, τ = τ_pos if A > 0 else τ_neg. Returns (per_tok, dper_tok/dℓ)."""
    lp, op, ad, m = logp.tolist(), old_logp.tolist(), adv.tolist(), mask.tolist()
    b, t = mask.shape
    out = torch.zeros(b, t, dtype=torch.float64)
    grad = torch.zeros(b, t, dtype=torch.float64)
    for i in range(b):
        for j in range(t):
            if m[i][j]:
                d = lp[i][j] - op[i][j]
                rho = math.exp(_clamp(d, -CLAMP, CLAMP))
                a = ad[i][j]
                tau = tau_pos if a > 0 else tau_neg
                s = _sigmoid(tau * (rho - 1.0))
                out[i, j] = -a * s * 4.0 / tau
                # d/dℓ: σ'(τ(ρ−1))·τ·ρ·4/τ = 4σ(1−σ)ρ (0 where the clamp is active)
                grad[i, j] = -a * 4.0 * s * (1.0 - s) * rho if -CLAMP < d < CLAMP else 0.0
    return out, grad


def dppo_mask(logp, old_logp, mask, *, delta):
    """True where a valid token's ratio ρ = exp(ℓ − ℓ°) leaves [1/δ, δ] (any sign of A)."""
    lp, op, m = logp.tolist(), old_logp.tolist(), mask.tolist()
    b, t = mask.shape
    out = torch.zeros(b, t, dtype=torch.bool)
    for i in range(b):
        for j in range(t):
            if m[i][j]:
                rho = math.exp(_clamp(lp[i][j] - op[i][j], -CLAMP, CLAMP))
                out[i, j] = rho < 1.0 / delta or rho > delta
    return out
