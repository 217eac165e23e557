"""Statistics and tables of a grid with a learning-rate sweep (`lr_sweep` in its config).

Everything here reads run records only. Accuracy is reported as mean ± the half-width of the 95 %
t-interval over seeds; differences between methods (and between budgets of one method) are paired by
seed, and a difference is *resolved* when its interval excludes 0.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass

from scipy import stats

FULL_METHODS = ("full", "full_frozen_bn")  # full fine-tuning as it is usually run, and with BN statistics kept

# The claims the grid is asked to resolve: (label, method a, method b) means "a ≥ b at equal budget".
CLAIMS = (
    ("MeDyate ≥ TraDy", "medyate", "trady"),
    ("MeDyate-CA ≥ TraDy", "medyate-ca", "trady"),
    ("MeDyate-CA ≥ MeDyate", "medyate-ca", "medyate"),
    ("TraDy ≥ static random", "trady", "static_random"),
    ("MeDyate ≥ static random", "medyate", "static_random"),
    ("MeDyate-CA ≥ static random", "medyate-ca", "static_random"),
)


@dataclass(frozen=True)
class Interval:
    """Mean ± half-width of the 95 % t-interval of `n` values (half is NaN for n < 2)."""

    mean: float
    half: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Interval:
        n = len(values)
        if n == 0:
            return cls(math.nan, math.nan, 0)
        mean = statistics.fmean(values)
        if n < 2:
            return cls(mean, math.nan, 1)
        return cls(mean, float(stats.t.ppf(0.975, n - 1)) * statistics.stdev(values) / math.sqrt(n), n)

    @property
    def low(self) -> float:
        return self.mean - self.half

    @property
    def high(self) -> float:
        return self.mean + self.half

    @property
    def resolved(self) -> bool:
        """The interval excludes 0 (never with fewer than two values)."""
        return self.n >= 2 and (self.low > 0 or self.high < 0)

    def text(self, scale: float = 100.0, signed: bool = False) -> str:
        if self.n == 0:
            return "-"
        mean = f"{scale * self.mean:+.2f}" if signed else f"{scale * self.mean:.2f}"
        if self.n < 2:
            return f"{mean} (n=1)"
        return f"{mean} ± {scale * self.half:.2f} (n={self.n})"


def verdict(diff: Interval) -> str:
    """What a paired difference a − b says about the claim a ≥ b."""
    if diff.n == 0:
        return "not run (no paired seeds)"
    if diff.n < 2:
        return "not resolved (n < 2)"
    if diff.low > 0:
        return "**holds, resolved**"
    if diff.high < 0:
        return "**fails, resolved**"
    return "holds, not resolved" if diff.mean >= 0 else "fails, not resolved"


def paired(a: dict[int, float], b: dict[int, float]) -> Interval:
    """Interval of a − b over the seeds both have."""
    return Interval.of([a[s] - b[s] for s in sorted(set(a) & set(b))])


Key = tuple[str, str, str, int | None]  # network, dataset, method, budget


def by_seed(records: list[dict]) -> dict[Key, dict[int, float]]:
    """Test top-1 per (network, dataset, method, budget) and seed."""
    out: dict[Key, dict[int, float]] = defaultdict(dict)
    for r in records:
        out[(r["network"], r["dataset"], r["method"], r["budget_slots"])][r["seed"]] = r["top1"]
    return out


def claim_rows(finals: list[dict]) -> list[tuple[str, str, int, Interval]]:
    """(network / dataset, claim, budget, paired difference) for every claim whose two methods ran."""
    top = by_seed(finals)
    cells = sorted({(k[0], k[1]) for k in top})
    rows = []
    for network, dataset in cells:
        budgets = sorted({k[3] for k in top if k[:2] == (network, dataset) and k[3] is not None})
        ran = {k[2] for k in top if k[:2] == (network, dataset)}
        for label, a, b in (claim for claim in CLAIMS if {claim[1], claim[2]} <= ran):  # methods of this grid
            for budget in budgets:
                x, y = top.get((network, dataset, a, budget)), top.get((network, dataset, b, budget))
                if x or y:  # one side alone at this budget: listed, with no paired seeds
                    rows.append((f"{network} / {dataset}", label, budget, paired(x or {}, y or {})))
    return rows


def trend_rows(finals: list[dict]) -> list[tuple[str, str, int, int, Interval]]:
    """(network / dataset, method, smaller budget, larger budget, paired top-1 change) for consecutive and end budgets."""
    top = by_seed(finals)
    rows = []
    for network, dataset, method in sorted({k[:3] for k in top if k[3] is not None}):
        budgets = sorted(k[3] for k in top if k[:3] == (network, dataset, method) and k[3] is not None)
        pairs = list(zip(budgets, budgets[1:], strict=False))
        if len(budgets) > 2:
            pairs.append((budgets[0], budgets[-1]))
        for small, large in pairs:
            diff = paired(top[(network, dataset, method, large)], top[(network, dataset, method, small)])
            rows.append((f"{network} / {dataset}", method, small, large, diff))
    return rows


def meets_default_bar(finals: list[dict], method: str, reference: str = "trady") -> tuple[bool, list[str]]:
    """Whether `method` may be the default: on every cell and budget the grid ran, method − reference is not
    resolved below 0, and no budget step of the method is resolved below 0 with the largest budget's mean at
    least the smallest's. Returns (verdict, the reasons it fails or the cells it was checked on)."""
    reasons, checked = [], []
    if method == reference:  # the reference is >= itself: only its budget trend is checked
        checked = sorted({f"{r['network']} / {r['dataset']} @ {r['budget_slots']:,}" for r in finals
                          if r["method"] == method})
    for cell, label, budget, diff in claim_rows(finals):
        if label.split(" ≥ ")[0] != _label(method) or label.split(" ≥ ")[1] != _label(reference):
            continue
        checked.append(f"{cell} @ {budget:,}")
        if diff.n < 2:
            reasons.append(f"{cell} @ {budget:,}: fewer than 2 paired seeds")
        elif diff.high < 0:
            reasons.append(f"{cell} @ {budget:,}: {diff.text(signed=True)} pp below {reference}, resolved")
    for cell, m, small, large, diff in trend_rows(finals):
        if m != method:
            continue
        if diff.n < 2:
            reasons.append(f"{cell}: {small:,} → {large:,} has fewer than 2 paired seeds")
        elif diff.high < 0 or (diff.mean < 0 and (small, large) == _ends(finals, cell, method)):
            reasons.append(f"{cell}: top-1 falls {small:,} → {large:,} ({diff.text(signed=True)} pp)")
    if not checked:
        reasons.append(f"no cell has both {method} and {reference}" if method != reference else f"no {method} run")
    return not reasons, reasons or checked


_LABELS = {"medyate": "MeDyate", "medyate-ca": "MeDyate-CA", "trady": "TraDy", "static_random": "static random"}


def _label(method: str) -> str:
    return _LABELS.get(method, method)


def _ends(finals: list[dict], cell: str, method: str) -> tuple[int, int]:
    budgets = sorted({r["budget_slots"] for r in finals if f"{r['network']} / {r['dataset']}" == cell
                      and r["method"] == method})
    return budgets[0], budgets[-1]


# -- markdown ---------------------------------------------------------------------------------------
def _ms(r: dict) -> float:
    return 1000 * r["step_time_median_s"]


def sweep_table(sweeps: list[dict], chosen: dict[tuple[str, str, str], float], label: dict[str, str]) -> list[str]:
    """Validation top-1 of every sweep run, the chosen learning rate in bold."""
    lrs = sorted({r["lr"] for r in sweeps})
    lines = ["| network / dataset | method | budget (slots) | " + " | ".join(f"lr {lr:g}" for lr in lrs)
             + " | chosen lr |", "|---|---|---:|" + "---:|" * len(lrs) + "---:|"]
    cells = sorted({(r["network"], r["dataset"], r["method"]) for r in sweeps}, key=lambda k: (k[0], _order(k[2])))
    for network, dataset, method in cells:
        rs = {r["lr"]: r for r in sweeps if (r["network"], r["dataset"], r["method"]) == (network, dataset, method)}
        best = chosen.get((network, dataset, method))
        vals = [("-" if lr not in rs else _score(rs[lr], bold=lr == best)) for lr in lrs]
        budget = next(iter(rs.values()))["budget_slots"]
        lines.append(f"| {network} / {dataset} | {label.get(method, method)} | "
                     f"{'-' if budget is None else f'{budget:,}'} | " + " | ".join(vals)
                     + f" | {_choice(best, rs, lrs)} |")
    return [*lines, ""]


def diverged(r: dict) -> bool:
    """A sweep run stopped on a non-finite loss or gradient: recorded without scores."""
    return r.get("diverged_at_step") is not None


def _score(r: dict, bold: bool = False) -> str:
    """A sweep run's validation top-1 %, or the step its loss went non-finite at."""
    if diverged(r):
        return f"diverged (step {r['diverged_at_step']})"
    return f"**{100 * r['val_top1']:.2f}**" if bold else f"{100 * r['val_top1']:.2f}"


def _choice(best: float | None, rs: dict[float, dict], lrs: list[float]) -> str:
    if best is not None:
        return f"{best:g}"
    complete = len(rs) == len(lrs)
    return "every lr diverged" if complete and all(map(diverged, rs.values())) else "sweep incomplete"


def _order(method: str) -> int:
    order = ("full", "full_frozen_bn", "classifier", "lora", "static_random", "trady", "medyate", "medyate-ca")
    return order.index(method) if method in order else len(order)


def results_table(finals: list[dict], label: dict[str, str]) -> list[str]:
    """Test top-1 (mean ± 95 % t) per network, method and budget, with what each run trained and its clipping."""
    groups: dict[Key, list[dict]] = defaultdict(list)
    for r in finals:
        groups[(r["network"], r["dataset"], r["method"], r["budget_slots"])].append(r)
    lines = ["| network / dataset | method | budget (slots) | lr | test top-1 % (mean ± 95 % t) | per seed | "
             "val top-1 % | draws | weight slots of the last draw | saved act. KiB (batch 32) | step ms | "
             "median grad norm | clipped steps |",
             "|---|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key in sorted(groups, key=lambda k: (k[0], k[1], _order(k[2]), k[3] or 0)):
        rs = sorted(groups[key], key=lambda r: r["seed"])
        seeds = ", ".join(f"s{r['seed']} {100 * r['top1']:.2f}" for r in rs)
        used = [r["weight_grad_bytes_used"] / 4 for r in rs if r.get("weight_grad_bytes_used") is not None]
        draws = sorted({r["draws"] for r in rs if r.get("draws") is not None})
        norms = [r["grad_norm_median"] for r in rs if r.get("grad_norm_median") is not None]
        clipped = [r["clipped_share"] for r in rs if r.get("clipped_share") is not None]
        lines.append(
            f"| {key[0]} / {key[1]} | {label.get(key[2], key[2])} | {'-' if key[3] is None else f'{key[3]:,}'} | "
            f"{rs[0]['lr']:g} | {Interval.of([r['top1'] for r in rs]).text()} | "
            f"{seeds} | "
            f"{100 * statistics.fmean(r['val_top1'] for r in rs):.2f} | {'/'.join(map(str, draws)) or '-'} | "
            f"{f'{statistics.fmean(used):,.0f}' if used else '-'} | "
            f"{statistics.fmean(r['saved_activation_bytes'] for r in rs) / 1024:,.0f} | "
            f"{statistics.median(_ms(r) for r in rs):.0f} | "
            f"{f'{statistics.median(norms):.2f}' if norms else '-'} | "
            f"{f'{100 * statistics.fmean(clipped):.0f} %' if clipped else '-'} |")
    return [*lines, ""]


def claims_table(finals: list[dict]) -> list[str]:
    lines = ["| network / dataset | claim (a ≥ b at equal budget) | budget (slots) | a − b, pp (paired by seed, "
             "95 % t) | verdict |", "|---|---|---:|---|---|"]
    for cell, claim, budget, diff in claim_rows(finals):
        lines.append(f"| {cell} | {claim} | {budget:,} | {diff.text(signed=True)} | {verdict(diff)} |")
    return [*lines, ""]


def trend_table(finals: list[dict], label: dict[str, str]) -> list[str]:
    lines = ["| network / dataset | method | budget step (slots) | top-1 change, pp (paired by seed, 95 % t) | "
             "more memory ... |", "|---|---|---|---|---|"]
    for cell, method, small, large, diff in trend_rows(finals):
        word = ("helps, resolved" if diff.resolved and diff.mean > 0 else "**hurts, resolved**" if diff.resolved
                else "helps, not resolved" if diff.mean >= 0 else "hurts, not resolved")
        lines.append(f"| {cell} | {label.get(method, method)} | {small:,} → {large:,} | "
                     f"{diff.text(signed=True)} | {word} |")
    return [*lines, ""]


def upper_bound_table(finals: list[dict], label: dict[str, str]) -> list[str]:
    """Full fine-tuning − every budgeted method at every budget, paired by seed: the upper bound holds where > 0."""
    top = by_seed(finals)
    lines = ["| network / dataset | full FT − method | budget (slots) | difference, pp (paired by seed, 95 % t) | "
             "full FT is the upper bound ... |", "|---|---|---:|---|---|"]
    rows = sorted(top.items(), key=lambda kv: (kv[0][:2], _order(kv[0][2]), kv[0][3] or 0))
    for upper in FULL_METHODS:
        for (network, dataset, method, budget), seeds in rows:
            full = top.get((network, dataset, upper, None))
            if budget is None or not full:
                continue
            diff = paired(full, seeds)
            word = {"**holds, resolved**": "**yes, resolved**", "**fails, resolved**": "**no, resolved**"}.get(
                verdict(diff), verdict(diff).replace("holds", "yes").replace("fails", "no"))
            lines.append(f"| {network} / {dataset} | {label.get(upper, upper)} − {label.get(method, method)} | "
                         f"{budget:,} | {diff.text(signed=True)} | {word} |")
    if len(lines) == 2:
        return ["No network has both full fine-tuning and a budgeted method recorded.", ""]
    return [*lines, ""]


def clipping_table(unclipped: list[dict], clipped_records: list[dict], label: dict[str, str]) -> list[str]:
    """Each unclipped sweep run beside the clipped suite's run of the same network, method, budget, seed and lr.

    A method needs clipping where its best clipped lr beats its best unclipped one on validation (an
    unclipped run whose loss went non-finite has no score; an older one left no record: either way its lr
    counts as lost without the clip).
    """
    index = {(r["network"], r["dataset"], r["method"], r["budget_slots"], r["seed"], r.get("lr")): r
             for r in clipped_records if r.get("phase") == "sweep"}
    lines = ["| network / dataset | method | lr | val top-1 %, unclipped | clipped (1.0) | median grad norm, "
             "unclipped |", "|---|---|---:|---:|---:|---:|"]
    best: dict[tuple, list[float]] = defaultdict(lambda: [-1.0, -1.0])
    for r in sorted(unclipped, key=lambda r: (r["network"], _order(r["method"]), r["lr"])):
        c = index.get((r["network"], r["dataset"], r["method"], r["budget_slots"], r["seed"], r["lr"]))
        key = (r["network"], r["dataset"], r["method"])
        if not diverged(r):
            best[key][0] = max(best[key][0], r["val_top1"])
        # every clipped lr counts, also one whose unclipped run diverged
        best[key][1] = max([best[key][1]] + [v["val_top1"] for k, v in index.items()
                                             if k[:3] == key[:3] and not diverged(v)])
        norm = r.get("grad_norm_median")
        with_clip = "-" if c is None else _score(c)
        lines.append(f"| {r['network']} / {r['dataset']} | {label.get(r['method'], r['method'])} | {r['lr']:g} | "
                     f"{_score(r)} | {with_clip} | {'-' if norm is None else f'{norm:.2f}'} |")
    lines += ["", "| network / dataset | method | best unclipped | best clipped | needs clipping |",
              "|---|---|---:|---:|---|"]
    for (network, dataset, method), (free, clip) in best.items():
        need = "-" if clip < 0 else ("yes" if clip > free else "no")
        lines.append(f"| {network} / {dataset} | {label.get(method, method)} | "
                     f"{'every lr diverged' if free < 0 else f'{100 * free:.2f}'} | "
                     f"{'-' if clip < 0 else f'{100 * clip:.2f}'} | {need} |")
    return [*lines, ""]


def default_lines(finals: list[dict], candidates: tuple[str, ...], label: dict[str, str]) -> list[str]:
    """The default's bar (≥ TraDy within the interval at every budget, no fall with the budget), per candidate."""
    lines = ["| candidate default | meets the bar | why / checked on |", "|---|---|---|"]
    for method in candidates:
        ok, reasons = meets_default_bar(finals, method)
        lines.append(f"| {label.get(method, method)} | {'yes' if ok else 'no'} | {'; '.join(reasons)} |")
    return [*lines, ""]
